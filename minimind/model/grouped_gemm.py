"""One matrix multiply per expert over rows sorted by expert, with the group boundaries on the device.

``grouped_linear(rows, weight, ends)`` computes ``rows[ends[e-1]:ends[e]] @ weight[e].T`` for every
expert ``e`` (``ends`` is the running count of rows per expert, int32). The output has the shape of
the input whatever the routing, so an MoE layer built on it has no data-dependent shape and
``torch.compile`` traces it as one graph.

Two implementations compute it:

- torch's grouped GEMM kernel (``torch.nn.functional.grouped_mm``; ``torch._grouped_mm`` before
  torch 2.10) on CUDA in bf16, the dtype it has kernels for (compute capability 8.0 and up): it reads
  the boundaries on the device, so the host never waits for it.
- otherwise (CPU, fp32 or fp16 on CUDA, an older torch) a loop over the experts inside one custom
  operator, so it is one opaque node to ``torch.compile``, whose meta kernel for ``grouped_mm``
  accepts bf16 only. It reads the boundaries on the host once per call: nothing to wait for on CPU,
  one synchronisation per call on CUDA (torch's own fallback for non-bf16 grouped GEMM does the same).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# The bf16 kernel reads rows and weights in 16-byte aligned strides: dimensions in multiples of 8.
_KERNEL_ALIGNMENT = 8


def grouped_linear(rows: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``rows`` [R, in] sorted by expert, ``weight`` [experts, out, in], ``ends`` [experts] int32 -> [R, out]."""
    if _kernel_applies(rows, weight):
        return _GROUPED_MM(rows, weight.transpose(1, 2), offs=ends)
    return torch.ops.minimind.grouped_linear_loop(rows, weight, ends)


def _kernel_applies(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        _GROUPED_MM is not None
        and rows.device.type == "cuda"
        and rows.dtype == weight.dtype == torch.bfloat16
        and rows.shape[1] % _KERNEL_ALIGNMENT == 0
        and weight.shape[1] % _KERNEL_ALIGNMENT == 0
        and torch.cuda.get_device_capability(rows.device) >= (8, 0)
    )


@torch.library.custom_op("minimind::grouped_linear_loop", mutates_args=())
def _grouped_linear_loop(rows: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    outputs, start = [], 0
    for expert, end in enumerate(ends.tolist()):
        # F.linear, as nn.Linear computes it: an expert's rows give what its module would give them.
        outputs.append(F.linear(rows[start:end], weight[expert]))
        start = end
    return torch.cat(outputs)


@_grouped_linear_loop.register_fake
def _(rows: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[1])


@torch.library.custom_op("minimind::grouped_linear_loop_backward", mutates_args=())
def _grouped_linear_loop_backward(
    rows: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor, grad_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_rows, grad_weight, start = [], torch.zeros_like(weight), 0
    for expert, end in enumerate(ends.tolist()):
        grad_rows.append(grad_out[start:end] @ weight[expert])
        grad_weight[expert] = grad_out[start:end].t() @ rows[start:end]
        start = end
    return torch.cat(grad_rows), grad_weight


@_grouped_linear_loop_backward.register_fake
def _(rows, weight, ends, grad_out):
    return torch.empty_like(rows), torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    rows, weight, ends = inputs
    ctx.save_for_backward(rows, weight, ends)


def _backward(ctx, grad_out: torch.Tensor):
    rows, weight, ends = ctx.saved_tensors
    grad_rows, grad_weight = torch.ops.minimind.grouped_linear_loop_backward(rows, weight, ends, grad_out.contiguous())
    return grad_rows, grad_weight, None


_grouped_linear_loop.register_autograd(_backward, setup_context=_setup_context)

__all__ = ["grouped_linear"]
