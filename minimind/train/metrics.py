"""Throughput and model-FLOPs utilisation (MFU) bookkeeping."""

from __future__ import annotations

import re

import torch

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s per GPU, from the vendors' datasheets,
# which quote sparse figures: half of "with sparsity". Keys are model names as they appear in
# torch.cuda.get_device_name() ("NVIDIA H100 NVL", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB");
# :func:`peak_bf16_tflops` takes the longest key that appears as whole words in a name, so the
# NVL and PCIe variants are never read as the SXM part and "L4" is not "L40S".
PEAK_BF16_TFLOPS: dict[str, float] = {
    # NVIDIA H100 datasheet: SXM 1,979 / PCIe (and NVL, per GPU) 1,513 / 1,671 sparse.
    "H100": 989.0,  # SXM; also "H100 80GB HBM3", "H100 SXM5"
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    # NVIDIA H200 datasheet: SXM 1,979 / NVL 1,671 sparse.
    "H200": 989.0,
    "H200 NVL": 835.0,
    "GH200": 989.0,  # GH200 Grace Hopper datasheet: 1,979 sparse
    # H800 (China export H100): the H100's tensor cores, SXM and PCIe.
    "H800": 989.0,
    "H800 PCIe": 756.0,
    # NVIDIA HGX B200 / GB200 NVL72 specifications: 4.5 / 5 PFLOPS FP16/BF16 sparse per GPU.
    "B200": 2250.0,
    "GB200": 2500.0,
    # NVIDIA A100 datasheet: 624 sparse (SXM and PCIe alike); A800 the same silicon.
    "A100": 312.0,
    "A800": 312.0,
    # NVIDIA L40S datasheet: 733 sparse (362.05 dense); L40 datasheet: 362.1 sparse; L4 datasheet: 242 sparse.
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    # NVIDIA A10 datasheet: 250 sparse. The A10G (AWS G5) has no vendor datasheet: 70 is the figure
    # commonly quoted for it (GA102's GeForce-rate tensor cores, as the RTX 3090's 71), not a datasheet's.
    "A10": 125.0,
    "A10G": 70.0,
    # GeForce Ada / Ampere whitepapers: bf16 with fp32 accumulation, dense.
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    # V100 has no bf16: its fp16 tensor-core peak (V100 SXM2 datasheet), the precision it trains in.
    "V100": 125.0,
}


def peak_bf16_tflops(device_name: str) -> float | None:
    """The table's peak for a ``torch.cuda.get_device_name()`` string, or None for an unknown GPU.

    A key matches when it appears in the name as whole words (letters and digits not continuing on
    either side; case ignored); of several matches the longest, the most specific, wins.
    """
    matches = [
        key
        for key in PEAK_BF16_TFLOPS
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name, re.IGNORECASE)
    ]
    return PEAK_BF16_TFLOPS[max(matches, key=len)] if matches else None


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of ``device`` (``override_tflops`` when given), or None when unknown or not a GPU."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    tflops = peak_bf16_tflops(torch.cuda.get_device_name(device))
    return None if tflops is None else tflops * 1e12


def mfu(tokens_per_second: float, flops_per_token: float, peak: float | None) -> float | None:
    return None if peak is None else tokens_per_second * flops_per_token / peak
