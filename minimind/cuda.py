"""Which torch build the project pins, and which NVIDIA driver its CUDA needs (no torch import: ``check-cluster``
and the training processes both read it).

CUDA's minor-version compatibility lets a build for CUDA X.y run on any driver of the X.* family from that
family's first release on, so the driver a CUDA major needs is one number: 525 for CUDA 12 (525.60.13 on Linux),
580 for CUDA 13 (580.65.06). torch 2.13.0 from PyPI is a CUDA 13 build, so every GPU node needs driver >= 580.
"""

from __future__ import annotations

import re

PINNED_TORCH = "2.13.0"
"""The torch every node installs (``scripts/setup_env.sh``, the cluster files, the RayJob)."""

PYPI_TORCH_CUDA = {"2.13": 13}
"""torch minor version -> the CUDA major of its default (PyPI) Linux wheel."""

MIN_DRIVER = {11: 450, 12: 525, 13: 580}
"""CUDA major -> the oldest NVIDIA Linux driver branch that runs it (minor-version compatibility)."""


class DeviceError(RuntimeError):
    """A GPU was asked for and this process cannot use one."""


def torch_cuda_major(version: str, index_url: str | None = None) -> int | None:
    """The CUDA major of ``torch==version`` installed from ``index_url`` (PyPI when None); None when unknown.

    PyTorch's own indexes name their CUDA (``.../whl/cu130`` -> 13, ``.../whl/cpu`` -> no CUDA, 0), and so does a
    local version (``2.13.0+cu128``)."""
    tagged = re.search(r"\+cu(\d+?)(\d)$", version) or re.search(r"/whl/cu(\d+?)(\d)/?$", index_url or "")
    if tagged:
        return int(tagged.group(1))
    if version.endswith("+cpu") or re.search(r"/whl/cpu/?$", index_url or ""):
        return 0
    if index_url is None:
        minor = ".".join(version.split("+")[0].split(".")[:2])
        return PYPI_TORCH_CUDA.get(minor)
    return None


def driver_needed(cuda_major: int | None) -> int | None:
    """The minimum driver branch for a CUDA major (None: unknown or no CUDA)."""
    return MIN_DRIVER.get(cuda_major) if cuda_major else None


def driver_version(text: str) -> str | None:
    """The driver version in ``/proc/driver/nvidia/version`` (``... Kernel Module  580.65.06 ...``)."""
    found = re.search(r"Kernel Module(?: for \w+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return found.group(1) if found else None
