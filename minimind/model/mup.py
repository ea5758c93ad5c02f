"""μP for Adam (Yang et al. 2022, "Tensor Programs V"): hyperparameters tuned at one width hold at others.

``model.parametrization: mup`` with ``model.mup_base_width`` (the width they are tuned at). With the
width multiplier ``m = hidden_size / mup_base_width``, μP is these changes to the standard model, each
1 at the base width, where μP *is* the standard model (EleutherAI's nanoGPT-mup lists the same set;
microsoft/mup's ``MuSharedReadout`` and ``MuAdam`` are the tied-readout and optimizer parts):

==================================================  ===================  ==========
parameter                                           init std             Adam lr
==================================================  ===================  ==========
hidden matrices (q, k, v, o; SwiGLU; every expert)  ``std / sqrt(m)``    ``lr / m``
the MoE router (fan-in grows, fan-out fixed)        ``std / m``          ``lr / m``
embedding (tied with the readout), norm weights     unchanged            unchanged
==================================================  ===================  ==========

and two multipliers in the forward pass:

- logits ``* 1/m``: the tied readout's output multiplier (a readout of width-sized inputs would
  otherwise grow with width once trained);
- attention scores ``* sqrt(d_base) / d`` instead of ``1 / sqrt(d)`` (``d`` the head dimension,
  ``d_base`` the base model's with as many heads): queries and keys become correlated in training,
  and their dot product then grows like ``d``, not ``sqrt(d)``.

Every hidden matrix's fan-in (the width, the heads' total, or the SwiGLU width) scales with the width.
GQA's key/value projections and QK-norm's per-head norms follow the table as they are. LoRA adapters
(fine-tuning, after μP pretraining) keep the base lr. The exports fold the two multipliers into ordinary
weights (:func:`standard_state_dict`), so transformers and MiniMind load a standard model.

**Depth transfer**, ``model.depth_transfer: completep`` with ``model.depth_base_layers`` (the depth they
are tuned at): CompleteP (Dey et al. 2025, "Don't be lazy: CompleteP enables compute-efficient deep
transformers", arXiv 2505.01618, Table 1; the authors' reference is EleutherAI/nanoGPT-mup, branch
``completep``), the depth exponent ``alpha = 1``. With the depth multiplier ``m_L = num_layers /
depth_base_layers``, these factors multiply μP's, each 1 at the base depth, where CompleteP *is* μP:

==================================================  ===========================  ==========
parameter or quantity                               CompleteP, general alpha     alpha = 1
==================================================  ===========================  ==========
each residual branch's output (attention, MLP/MoE)  ``m_L ** -alpha``            ``1 / m_L``
Adam lr of a block's matrices and norm weights      ``m_L ** (alpha - 1)``       1
Adam epsilon (every parameter)                      ``m_L ** -alpha``            ``1 / m_L``
init std; embedding and final norm lr               unchanged                    unchanged
==================================================  ===========================  ==========

Scaling each branch by ``1/m_L`` keeps every block's share of the residual stream ``1/L``-sized, at
init and after training alike, so the stream (a sum of ``L`` blocks) and its change in training stay
the same size at every depth. An Adam step's size does not depend on the gradient's, so at ``alpha = 1``
a block's weights move as much as at the base depth (its branch learns features relative to its own
size: not lazily) and the lr needs no depth factor; epsilon does, since the gradients through the scaled
branches shrink like ``1/L`` and must stay large against it. Table 1's width rules beyond μP's above
(epsilon ``/ m``, hidden weight decay ``* m``) are left out, as under plain μP. The exports fold the
branch multiplier into each branch's last projection (``o_proj``; ``down_proj``, every expert's under MoE).
"""

from __future__ import annotations

import math

import torch

from minimind.config import ModelConfig

ROUTER_SUFFIX = ".mlp.gate.weight"
"""The MoE router (``mlp.gate``; a dense SwiGLU's is ``mlp.gate_proj``)."""


def width_multiplier(config: ModelConfig) -> float:
    """``hidden_size / mup_base_width`` under μP; 1 under the standard parametrization."""
    if config.parametrization != "mup":
        return 1.0
    return config.hidden_size / (config.mup_base_width or config.hidden_size)


COMPLETEP_ALPHA = 1.0
"""CompleteP's depth exponent (``alpha = 1/2`` would be the earlier Depth-μP, which the paper finds lazy)."""

RESIDUAL_BRANCH_OUTPUTS = (".self_attn.o_proj.weight", ".down_proj.weight")
"""Each residual branch's last projection: attention's output, the SwiGLU's (every expert's) down."""


def depth_multiplier(config: ModelConfig) -> float:
    """``num_layers / depth_base_layers`` under CompleteP; 1 without depth transfer."""
    if config.depth_transfer != "completep":
        return 1.0
    return config.num_layers / (config.depth_base_layers or config.num_layers)


def residual_multiplier(config: ModelConfig) -> float:
    """Factor on each residual branch's output before it is added to the stream: ``m_L ** -alpha``."""
    return depth_multiplier(config) ** -COMPLETEP_ALPHA


def epsilon_multiplier(config: ModelConfig) -> float:
    """Factor on Adam's epsilon (every parameter's): ``m_L ** -alpha``, as the branches' gradients shrink."""
    return depth_multiplier(config) ** -COMPLETEP_ALPHA


def is_hidden_matrix(name: str) -> bool:
    """A 2-D weight whose fan-in and fan-out both scale with width (all but the embedding and router)."""
    return name.endswith(".weight") and ".layers." in name and "norm" not in name and not name.endswith(ROUTER_SUFFIX)


def init_std_multiplier(name: str, config: ModelConfig) -> float:
    """Factor on the standard init's std (0.02) of parameter ``name``."""
    m = width_multiplier(config)
    if name.endswith(ROUTER_SUFFIX):
        return 1.0 / m
    return 1.0 / math.sqrt(m) if is_hidden_matrix(name) else 1.0


def lr_multiplier(name: str, config: ModelConfig) -> float:
    """Factor on the optimizer's learning rate for parameter ``name``."""
    if "lora_" in name:
        return 1.0
    m = width_multiplier(config)
    width_factor = 1.0 / m if is_hidden_matrix(name) or name.endswith(ROUTER_SUFFIX) else 1.0
    # CompleteP: every parameter inside a block (matrices, router, norm weights) by m_L ** (alpha - 1).
    depth_factor = depth_multiplier(config) ** (COMPLETEP_ALPHA - 1) if ".layers." in name else 1.0
    return width_factor * depth_factor


def output_multiplier(config: ModelConfig) -> float:
    """Factor on the logits: ``1 / m``."""
    return 1.0 / width_multiplier(config)


def attention_scale(config: ModelConfig) -> float | None:
    """Scale of the attention scores; None: PyTorch's default ``1 / sqrt(head_dim)`` (standard)."""
    if config.parametrization != "mup":
        return None
    base_head_dim = (config.mup_base_width or config.hidden_size) / config.num_heads
    return math.sqrt(base_head_dim) / config.head_dim


def standard_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as a standard-parametrization model of the same shapes computes the same
    logits with: the output multiplier folded into the final norm's weight (the readout is tied to the
    embedding, which must stay as it is), the attention scale's ratio to ``1 / sqrt(d)`` folded into
    the queries (into ``q_norm``'s weight under QK-norm, which would undo a scaled ``q_proj``), and
    CompleteP's residual multiplier into each branch's last projection (the branches are linear in it;
    an MoE's output is its experts' weighted sum). LoRA adapters are merged before (the exports refuse
    unmerged ones), so the multiplier scales the merged weight, as it scales the branch in training."""
    config = model.config
    state = dict(model.state_dict())
    if config.parametrization != "mup":
        return state
    state["model.norm.weight"] = state["model.norm.weight"] * output_multiplier(config)
    query_factor = attention_scale(config) * math.sqrt(config.head_dim)
    target = "self_attn.q_norm.weight" if config.qk_norm else "self_attn.q_proj.weight"
    for index in range(config.num_layers):
        name = f"model.layers.{index}.{target}"
        state[name] = state[name] * query_factor
    branch_factor = residual_multiplier(config)
    if branch_factor != 1.0:
        for name in state:
            if name.startswith("model.layers.") and name.endswith(RESIDUAL_BRANCH_OUTPUTS):
                state[name] = state[name] * branch_factor
    return state
