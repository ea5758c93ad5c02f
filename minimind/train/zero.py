"""DeepSpeed ZeRO as a strategy of the one loop (``distributed.strategy: deepspeed``).

The loop keeps what it owns under DDP: objectives, data position, the learning-rate schedule
(written into the optimizer's param groups each step), metrics and eval. The engine takes over
what ZeRO changes: backward (gradients reduced into partitions), clipping, the optimizer step
and, when enabled, loss scaling. Accumulation stays the loop's: the engine runs with
``managed_gradient_accumulation: false``, so every ``step()`` is the boundary and a step may have
fewer micro-batches (the last of an epoch) without the engine's counter drifting.

The DeepSpeed config comes from a JSON template (``zero_configs/zero{stage}.json`` or
``distributed.deepspeed_config``) whose ``"auto"`` fields are filled from the run config.

Checkpoints are the engine's own shards (``step_N/deepspeed/``: every rank writes its optimizer
partition and reports it to Ray, which merges them under the storage path); the final checkpoint
of a run also gets the consolidated fp32 ``model.safetensors`` that chat, export-hf and eval read,
and :func:`consolidate` writes one from any sharded checkpoint. DeepSpeed's shard files are
pickles read by DeepSpeed's own loader: resume only from storage you control.

Cooldown evaluations branch each rank's own partition of the engine's state in memory
(``minimind/train/zero_branch.py``).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param, set_z3_leaf_modules
from torch import nn

from minimind.config import TrainConfig, build_config
from minimind.model import MiniMindLM
from minimind.model.checkpoint import META_FILE, model_config_from_dict, resolve_checkpoint, save_model
from minimind.model.lora import apply_lora
from minimind.model.minimind import MoEFeedForward
from minimind.train.parallel import DataParallel
from minimind.train.zero_branch import master_partitions, restore_partition, snapshot_partition

TEMPLATES = Path(__file__).with_name("zero_configs")
SHARDS = "deepspeed"
"""Sub-folder of a checkpoint holding the engine's shards (DeepSpeed's checkpoint tag)."""
# Optimizer state that ZeRO-Offload keeps in host memory, per parameter: fp32 master weight,
# fp32 gradient and Adam's two moments.
OFFLOAD_BYTES_PER_PARAMETER = 16


def deepspeed_config(config: TrainConfig, dtype: torch.dtype, world_size: int) -> dict:
    """The engine's config: the template with every ``"auto"`` filled from ``config``."""
    dist_config = config.distributed
    template = Path(dist_config.deepspeed_config or TEMPLATES / f"zero{dist_config.zero_stage}.json")
    try:
        ds = json.loads(template.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"distributed.deepspeed_config: cannot read {template}: {error}") from error
    optim = config.optim
    ds.update(
        train_micro_batch_size_per_gpu=optim.batch_size,
        gradient_accumulation_steps=optim.grad_accum_steps,
        train_batch_size=optim.batch_size * optim.grad_accum_steps * world_size,
        gradient_clipping=optim.max_grad_norm,
        managed_gradient_accumulation=False,  # the loop owns accumulation (see the module docstring)
    )
    ds.setdefault("bf16", {})["enabled"] = dtype == torch.bfloat16
    ds.setdefault("fp16", {})["enabled"] = dtype == torch.float16
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = dist_config.zero_stage
    # Overlapping reduction with backward needs CUDA streams and, with the loop's own
    # accumulation, a stage that reduces per backward (2 or 3).
    if zero.get("overlap_comm", "auto") == "auto":
        zero["overlap_comm"] = dist_config.use_gpu and dist_config.zero_stage >= 2
    offload = zero.pop("offload_optimizer", None) or {}
    if dist_config.offload_optimizer:
        zero["offload_optimizer"] = {
            "device": "cpu",
            "pin_memory": dist_config.use_gpu if offload.get("pin_memory", "auto") == "auto" else offload["pin_memory"],
        }
        # On CPU workers the client optimizer (torch AdamW) steps the offloaded state; see parallelize.
        ds["zero_force_ds_cpu_optimizer"] = dist_config.use_gpu
    leftover = [key for key, value in _walk(ds) if value == "auto"]
    if leftover:
        raise ValueError(f"distributed.deepspeed_config: {template} has 'auto' fields nothing fills: {leftover}")
    return ds


def _walk(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def offload_bytes(num_parameters: int) -> int:
    """Host memory ZeRO-Offload needs for the whole model's optimizer state (all ranks together)."""
    return OFFLOAD_BYTES_PER_PARAMETER * num_parameters


class DeepSpeedZero(DataParallel):
    """ZeRO stage 0-3 through a DeepSpeed engine over Ray's (or torchrun's) process group."""

    sharded = True
    owns_precision = True

    def __init__(self, config: TrainConfig, device: torch.device, dtype: torch.dtype):
        super().__init__(device)
        self.config = config
        self.ds_config = deepspeed_config(config, dtype, self.world_size)
        self.name = f"deepspeed-zero{config.distributed.zero_stage}"
        self.engine = None
        self._plain_copy: MiniMindLM | None = None

    def parallelize(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        if self.config.distributed.offload_optimizer and self.device.type != "cpu":
            # Offloaded state is stepped on the host: DeepSpeed's vectorised CPU Adam (the same AdamW
            # update). CPU workers keep torch's AdamW, whose state is in host memory already, and skip
            # building DeepSpeed's C++ op (about a minute on 2 cores).
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            groups = [
                {"params": g["params"], "weight_decay": g["weight_decay"], "lr_scale": g["lr_scale"], "eps": g["eps"]}
                for g in optimizer.param_groups
            ]
            optimizer = DeepSpeedCPUAdam(
                groups, lr=self.config.optim.lr, betas=optimizer.defaults["betas"], adamw_mode=True
            )
        if self.config.distributed.zero_stage == 3 and self.config.model.moe.enabled:
            # An MoE layer reads its experts' weights itself (stacked for one grouped matrix multiply), not
            # through the experts' forward, where ZeRO-3 would gather them: gather the whole layer at once.
            set_z3_leaf_modules(model, [MoEFeedForward])
        if self.device.type == "cpu":
            # DeepSpeed's comm layer on CPU compiles a shared-memory all-reduce (a C++ op: about a minute
            # on 2 cores, again for each machine and install path) the first time it starts. CPU runs are
            # tests and development here: gloo's collectives, which Ray's process group already has, serve.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False
        )
        self.engine = engine
        if self.config.eval.cools_down:
            master_partitions(optimizer)  # a state cooldown branches cannot copy is refused before training
        return engine, optimizer

    def accumulating(self, model: nn.Module, last_micro_batch: bool):
        # Unmanaged accumulation: backward only accumulates; step() reduces and updates.
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, scaler=None) -> None:
        # The loop already divided by the step's targets; the engine must not divide again.
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, model: nn.Module, optimizer, max_norm: float, scaler=None) -> torch.Tensor:
        self.engine.step()  # clips to gradient_clipping, steps, zeroes the gradients
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(math.nan if norm is None else norm, dtype=torch.float32).detach().to(self.device)

    def full_model(self, model: nn.Module) -> nn.Module | None:
        """Every rank calls this (ZeRO-3 gathers); rank 0 gets a plain model with the fp32 master weights."""
        state = {}
        for name, parameter in model.named_parameters():
            full = safe_get_full_fp32_param(parameter)  # None for frozen parameters (LoRA's base)
            if self.rank == 0:
                state[name] = parameter.detach().float() if full is None else full
        if self.rank != 0:
            return None
        if self._plain_copy is None:
            lora = self.config.lora if self.config.lora.enabled else None
            self._plain_copy = plain_model(model.config, lora, self.device).requires_grad_(False)
        missing = {name for name, _ in self._plain_copy.named_parameters()} - set(state)
        if missing:
            raise RuntimeError(f"gathered weights lack {sorted(missing)[:5]}")
        self._plain_copy.load_state_dict(state, strict=False)
        return self._plain_copy

    def snapshot(self, model: nn.Module, optimizer) -> dict:
        """This rank's own partition of the engine's state, where it lives; no communication (see ``zero_branch``)."""
        return snapshot_partition(self.engine)

    def restore(self, model: nn.Module, optimizer, snapshot: dict) -> None:
        """Every rank calls this: the module's weights are rewritten from the restored partitions and gathered."""
        restore_partition(self.engine, snapshot)

    def save_sharded(self, directory: Path) -> None:
        """Every rank writes its shards into ``directory/deepspeed``."""
        self.engine.save_checkpoint(str(directory), tag=SHARDS, save_latest=False)

    def load_sharded(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory), tag=SHARDS, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise FileNotFoundError(f"{directory}/{SHARDS}: no DeepSpeed shards to resume from")


def plain_model(model_config, lora, device: torch.device | str = "cpu") -> MiniMindLM:
    """An unwrapped model of this architecture (with LoRA adapters when ``lora``), to load full weights into."""
    with torch.device(device):
        model = MiniMindLM(model_config)
    if lora:
        apply_lora(model, lora)
    return model


def consolidate(path: str | Path, output: str | Path | None = None) -> Path:
    """Write the fp32 ``model.safetensors`` of a sharded checkpoint (or a run's newest one).

    The result is a checkpoint in the project's normal format, in ``output`` or in place.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    directory = resolve_checkpoint(path)
    if not (directory / SHARDS).is_dir():
        raise FileNotFoundError(f"{directory} holds no DeepSpeed shards ({SHARDS}/); it needs no consolidation")
    meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=SHARDS)
    lora = build_config({"lora": meta["lora"]}).lora if meta.get("lora") else None
    model = plain_model(model_config_from_dict(meta["model"]), lora)
    expected = {name for name, _ in model.named_parameters()}
    missing = expected - set(state)
    if missing:
        raise ValueError(f"{directory}/{SHARDS}: shards lack {sorted(missing)[:5]}")
    model.load_state_dict({name: state[name] for name in expected}, strict=False)
    target = Path(output) if output else directory
    target.mkdir(parents=True, exist_ok=True)
    # In place the shards stay beside the weights; a copy elsewhere is a plain checkpoint.
    dropped = ("model", "lora", "base") if target == directory else ("model", "lora", "base", "sharded")
    extra = {k: v for k, v in meta.items() if k not in dropped}
    save_model(model, target, lora=lora, base=meta.get("base"), extra=extra)
    return target
