"""Device and precision choices resolved from RuntimeConfig; a run asked to use GPUs that sees no CUDA fails at
start (:mod:`minimind.devices`)."""

from __future__ import annotations

import contextlib

import torch

from minimind.config import RuntimeConfig, TrainConfig
from minimind.devices import require_cuda, select_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(runtime: RuntimeConfig) -> torch.device:
    """``auto``: the first GPU when torch sees one, else the CPU; ``cuda``/``cuda:N``: that GPU, or
    :class:`DeviceError` when it cannot be used."""
    return select_device(runtime.device, "runtime.device")


def check_gpu_request(config: TrainConfig) -> None:
    """An in-process run that asks for GPUs (``distributed.use_gpu`` or ``runtime.device: cuda``) must get one."""
    if config.distributed.use_gpu:
        require_cuda("distributed.use_gpu: true")
    resolve_device(config.runtime)


def resolve_dtype(runtime: RuntimeConfig, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs that compute in it (compute capability >= 8.0; no loss scaling needed), fp16
    (with the loop's GradScaler) on older GPUs, which only emulate bf16; fp32 on CPU."""
    if runtime.dtype != "auto":
        return DTYPES[runtime.dtype]
    if device.type == "cuda":
        return gpu_dtype(torch.cuda.get_device_capability(device))
    return torch.float32


def gpu_dtype(capability: tuple[int, int]) -> torch.dtype:
    """dtype auto on a GPU of this compute capability: bf16 from Ampere (8.0), fp16 below."""
    return torch.bfloat16 if capability >= (8, 0) else torch.float16


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context; weights stay fp32, matmuls run in ``dtype``."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
