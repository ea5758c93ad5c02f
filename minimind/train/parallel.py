"""How workers share the model: strategies the one loop plugs in, applied outside the model.

The loop asks a strategy to wrap the model (and its optimizer), to skip gradient synchronisation on
all micro-batches but the last of a step, to run backward and the optimizer step, to hand over the
full weights for eval and saving, and to sum tensors or gather objects across workers.
``SingleProcess`` does none of the sharing; ``DataParallel`` is PyTorch DDP over whatever process
group Ray Train (or ``torchrun``) set up; ``minimind.train.zero.DeepSpeedZero`` is a DeepSpeed
engine, which takes over backward, clipping and the step.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class SingleProcess:
    """One worker: no wrapping and no communication."""

    rank = 0
    world_size = 1
    name = "ddp"
    """Recorded in checkpoints: a run resumes only under the strategy that wrote it."""
    sharded = False
    """Whether every rank writes part of a checkpoint (else rank 0 writes it all)."""
    owns_precision = False
    """Whether the strategy does fp16 loss scaling itself (else the loop's GradScaler does)."""

    def parallelize(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """(the module the loop runs forward through, the optimizer the loop sets the lr on)."""
        return model, optimizer

    def accumulating(self, model: nn.Module, last_micro_batch: bool):
        """Context for one micro-batch's forward and backward."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, scaler: torch.amp.GradScaler | None = None) -> None:
        (scaler.scale(loss) if scaler else loss).backward()

    def step(self, model: nn.Module, optimizer, max_norm: float, scaler=None) -> torch.Tensor:
        """Clip to ``max_norm`` (0: no clipping), step and zero the gradients; return the gradient norm."""
        if scaler:
            scaler.unscale_(optimizer)
        trainable = [p for p in model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm if max_norm > 0 else math.inf)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def full_model(self, model: nn.Module) -> nn.Module | None:
        """The model with its full weights on rank 0 (for eval and saving); every rank calls this."""
        return model

    def snapshot(self, model: nn.Module, optimizer) -> dict:
        """A copy of what training changes (trainable weights, optimizer state), for :meth:`restore`."""
        weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        return {"weights": weights, "optimizer": copy.deepcopy(optimizer.state_dict())}

    def restore(self, model: nn.Module, optimizer, snapshot: dict) -> None:
        """Put back what :meth:`snapshot` copied, bit for bit."""
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in snapshot["weights"]:
                    parameter.copy_(snapshot["weights"][name])
        optimizer.load_state_dict(snapshot["optimizer"])

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``tensor`` reduced over workers (``sum``, ``min`` or ``max``)."""
        return tensor

    def all_gather_object(self, value) -> list:
        return [value]


class DataParallel(SingleProcess):
    """Distributed data parallel: every worker holds the model and gradients are averaged.

    ``find_unused_parameters`` is needed when a step can leave parameters without a gradient (no
    model here does: MoE experts that received no token get a zero gradient); it costs one extra
    graph traversal per step.
    """

    OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}

    def __init__(self, device: torch.device, find_unused_parameters: bool = False):
        if not dist.is_initialized():
            raise RuntimeError("DataParallel needs a torch.distributed process group (Ray Train sets one up)")
        self.device = device
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.find_unused_parameters = find_unused_parameters

    def parallelize(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # No buffer broadcast: the model's only buffers are the RoPE tables, computed alike on every rank,
        # which DDP would otherwise re-send every forward. Gradients as views into the buckets: no copy.
        wrapped = DistributedDataParallel(
            model,
            device_ids=device_ids,
            find_unused_parameters=self.find_unused_parameters,
            broadcast_buffers=False,
            gradient_as_bucket_view=True,
        )
        return wrapped, optimizer

    def accumulating(self, model: nn.Module, last_micro_batch: bool):
        # Gradients are all-reduced once per optimizer step, on its last micro-batch.
        return contextlib.nullcontext() if last_micro_batch else model.no_sync()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=self.OPS[op])
        return tensor

    def all_gather_object(self, value) -> list:
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered
