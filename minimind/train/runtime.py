"""Device and precision choices resolved from RuntimeConfig."""

from __future__ import annotations

import contextlib

import torch

from minimind.config import RuntimeConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(runtime: RuntimeConfig) -> torch.device:
    if runtime.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(runtime.device)


def resolve_dtype(runtime: RuntimeConfig, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs that support it (no loss scaling needed), fp32 elsewhere."""
    if runtime.dtype != "auto":
        return DTYPES[runtime.dtype]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context; weights stay fp32, matmuls run in ``dtype``."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
