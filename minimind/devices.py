"""Which device a process computes on, and the refusal of a GPU request it cannot serve: a run or a tool asked
to use GPUs that sees no CUDA fails at start, naming why (a CPU build of torch, no GPU visible, or a driver too
old for torch's CUDA), instead of running on the CPU in fp32. Training (``minimind/train/runtime.py``),
evaluation, ``generate`` and ``chat`` all choose their device here."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from minimind.cuda import DeviceError, driver_needed, driver_version

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


def select_device(requested: str = "auto", what: str = "--device") -> torch.device:
    """``auto`` (a GPU when present), ``cpu`` or ``cuda[:N]``: the device of a run (``runtime.device``),
    ``generate``, ``chat`` and evaluation; a GPU that cannot be used is refused with :class:`DeviceError`,
    naming ``what`` asked for it."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        require_cuda(f"{what} {requested}", device.index)
    return device
