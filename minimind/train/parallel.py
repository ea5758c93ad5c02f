"""How workers share the model: strategies the one loop plugs in, applied outside the model.

The loop asks a strategy to wrap the model, to skip gradient synchronisation on all micro-batches
but the last of a step, and to sum tensors or gather objects across workers. ``SingleProcess``
does none of it; ``DataParallel`` is PyTorch DDP over whatever process group Ray Train (or
``torchrun``) set up. DeepSpeed plugs in the same way.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class SingleProcess:
    """One worker: no wrapping and no communication."""

    rank = 0
    world_size = 1

    def parallelize(self, model: nn.Module) -> nn.Module:
        return model

    def accumulating(self, model: nn.Module, last_micro_batch: bool):
        """Context for one micro-batch's forward and backward."""
        return contextlib.nullcontext()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``tensor`` reduced over workers (``sum``, ``min`` or ``max``)."""
        return tensor

    def all_gather_object(self, value) -> list:
        return [value]


class DataParallel(SingleProcess):
    """Distributed data parallel: every worker holds the model and gradients are averaged.

    ``find_unused_parameters`` is needed when a step can leave parameters without a gradient,
    as MoE experts that received no token do; it costs one extra graph traversal per step.
    """

    OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}

    def __init__(self, device: torch.device, find_unused_parameters: bool = False):
        if not dist.is_initialized():
            raise RuntimeError("DataParallel needs a torch.distributed process group (Ray Train sets one up)")
        self.device = device
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.find_unused_parameters = find_unused_parameters

    def parallelize(self, model: nn.Module) -> nn.Module:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=self.find_unused_parameters)

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
