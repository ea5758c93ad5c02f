"""Named model sizes. Parameter counts match MiniMind's models exactly (MiniMind2 and minimind-3)."""

from __future__ import annotations

from typing import Any

from minimind.config.schema import ConfigError

# The minimind-3 family's shared shape; its MoE adds the experts.
MINIMIND3: dict[str, Any] = {
    "hidden_size": 768,
    "num_layers": 8,
    "num_heads": 8,
    "num_kv_heads": 4,
    "intermediate_size": 2432,
    "qk_norm": True,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
}

PRESETS: dict[str, dict[str, Any]] = {
    # MiniMind2-small: 25,829,888 parameters.
    "minimind-26m": {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 2},
    # MiniMind2: 104,030,976 parameters.
    "minimind-104m": {"hidden_size": 768, "num_layers": 16, "num_heads": 8, "num_kv_heads": 2},
    # MiniMind2-MoE: 145,029,760 parameters (4 routed + 1 shared expert, top-2).
    "minimind-moe-145m": {
        "hidden_size": 640,
        "num_layers": 8,
        "num_heads": 8,
        "num_kv_heads": 2,
        "moe": {"enabled": True, "num_routed_experts": 4, "num_shared_experts": 1, "top_k": 2},
    },
    # minimind-3 (dense): 63,912,192 parameters; FFN ceil(768*pi/64)*64, QK-norm.
    "minimind-3": MINIMIND3,
    # minimind-3-moe: 198,416,640 parameters (4 routed experts, top-1, no shared expert).
    "minimind-3-moe": {
        **MINIMIND3,
        "moe": {
            "enabled": True,
            "num_routed_experts": 4,
            "num_shared_experts": 0,
            "top_k": 1,
            "aux_loss_alpha": 5e-4,
            "balance_over": "batch",
        },
    },
    # For tests and CPU smoke runs: same vocabulary, a few hundred thousand parameters.
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "max_seq_len": 1024},
}


CUSTOM = "custom"
"""Preset name for architectures given field by field (imports, hand-written configs)."""


def preset_fields(name: str) -> dict[str, Any]:
    """Model fields of preset ``name`` (including ``preset`` itself); ``custom`` sets none."""
    if name == CUSTOM:
        return {"preset": CUSTOM}
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; choose from {sorted(PRESETS) + [CUSTOM]}")
    return {"preset": name, **PRESETS[name]}
