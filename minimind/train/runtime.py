"""Device and precision choices resolved from RuntimeConfig, and the refusal of a GPU request that this
process cannot serve: a run asked to use GPUs that sees no CUDA fails at start, naming why (a CPU build of
torch, no GPU visible, or a driver too old for torch's CUDA), instead of training on the CPU in fp32."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from minimind.config import RuntimeConfig, TrainConfig
from minimind.cuda import DeviceError, driver_needed, driver_version

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DRIVER_FILE = Path("/proc/driver/nvidia/version")


def cuda_missing_reason() -> str:
    """Why torch sees no CUDA device in this process."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU build"
    build = f"torch {torch.__version__} (built for CUDA {torch.version.cuda})"
    driver = driver_version(DRIVER_FILE.read_text()) if DRIVER_FILE.is_file() else None
    needed = driver_needed(int(torch.version.cuda.split(".")[0]))
    if driver is None:
        return f"{build} finds no NVIDIA driver here (no {DRIVER_FILE}; a CPU node, or a container without --gpus)"
    if needed and int(driver.split(".")[0]) < needed:
        return f"{build} needs NVIDIA driver >= {needed} and this node has {driver}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{build} sees no GPU (driver {driver}, CUDA_VISIBLE_DEVICES={visible!r})"


def require_cuda(what: str, index: int | None = None) -> None:
    """Raise :class:`DeviceError` unless CUDA (device ``index``, when given) is usable; ``what`` names the request."""
    if not torch.cuda.is_available():
        raise DeviceError(f"{what} asks for a GPU, but {cuda_missing_reason()}; not falling back to the CPU")
    if index is not None and index >= torch.cuda.device_count():
        raise DeviceError(f"{what} asks for cuda:{index}, but this process sees {torch.cuda.device_count()} GPU(s)")


def resolve_device(runtime: RuntimeConfig) -> torch.device:
    """``auto``: the first GPU when torch sees one, else the CPU; ``cuda``/``cuda:N``: that GPU, or
    :class:`DeviceError` when it cannot be used."""
    if runtime.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(runtime.device)
    if device.type == "cuda":
        require_cuda(f"runtime.device {runtime.device}", device.index)
    return device


def inference_device(requested: str = "auto", what: str = "--device") -> torch.device:
    """The device of ``generate``, ``chat`` and evaluation: ``auto`` (a GPU when present), ``cpu``, ``cuda[:N]``;
    a GPU that cannot be used is refused with :class:`DeviceError`, naming ``what`` asked for it."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        require_cuda(f"{what} {requested}", device.index)
    return device


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
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context; weights stay fp32, matmuls run in ``dtype``."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
