"""Throughput and model-FLOPs utilisation (MFU) bookkeeping."""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks in TFLOP/s, matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,
}


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of ``device`` from the table (first matching name), or None when unknown/CPU."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def mfu(tokens_per_second: float, flops_per_token: float, peak: float | None) -> float | None:
    return None if peak is None else tokens_per_second * flops_per_token / peak
