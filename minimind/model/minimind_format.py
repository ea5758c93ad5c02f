"""MiniMind's own weight files, both ways.

- ``.pth``: what MiniMind's trainers write (``lm_checkpoint``): ``torch.save`` of the model's state
  dict in fp16, the tied embedding under both ``model.embed_tokens.weight`` and ``lm_head.weight``;
  its ``*_resume.pth`` holds the same dict under ``"model"``. Parameter names are the same as here
  (MiniMind2 and minimind-3, dense and MoE), so nothing is renamed; the architecture is not in the
  file and comes from a preset.
- Transformers-MiniMind directories (``scripts/convert_model.py``, model_type ``minimind``): the
  architecture is in ``config.json``, the weights in ``pytorch_model.bin`` or ``model.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from minimind.config import ModelConfig
from minimind.model.checkpoint import TIED_KEY, model_config_from_dict
from minimind.model.lora import LoRALinear
from minimind.model.minimind import MiniMindLM
from minimind.model.mup import standard_state_dict

EMBEDDING_KEY = "model.embed_tokens.weight"
PTH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def import_minimind_pth(path: str | Path, config: ModelConfig) -> MiniMindLM:
    """A model of architecture ``config`` with the weights of MiniMind's ``.pth`` file ``path``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a *_resume.pth: weights, optimizer, step
    return model_from_state(state, config, str(path))


def export_minimind_pth(model: MiniMindLM, path: str | Path, dtype: str = "float16") -> Path:
    """Write ``model`` as MiniMind's trainers do, so its scripts load it (``load_state_dict``, strict)."""
    if any(isinstance(module, LoRALinear) for module in model.modules()):
        raise ValueError("merge LoRA adapters before export (load_model(..., merge=True))")
    state = {  # μP's multipliers folded in: MiniMind's model is a standard one
        name: tensor.detach().to(PTH_DTYPES[dtype]).cpu() for name, tensor in standard_state_dict(model).items()
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def import_minimind_hf(directory: str | Path) -> MiniMindLM:
    """A Transformers-MiniMind directory (model_type ``minimind``) of MiniMind2 or minimind-3."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "minimind":
        raise ValueError(f"{directory}/config.json: model_type {config.get('model_type')!r} is not 'minimind'")
    if (directory / "model.safetensors").exists():
        state = load_file(str(directory / "model.safetensors"))
    elif (directory / "pytorch_model.bin").exists():
        state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{directory}: neither model.safetensors nor pytorch_model.bin")
    return model_from_state(state, model_config_from_minimind(config, state), str(directory))


def model_config_from_minimind(config: dict, state: dict[str, torch.Tensor]) -> ModelConfig:
    """Our config for a MiniMind ``config.json``. minimind-3 names its MoE fields ``num_experts`` and
    ``router_aux_loss_coef`` (MiniMind2: ``n_routed_experts``, ``aux_loss_alpha``); its QK-norm has no
    flag, so it is read from the weights."""
    minimind3 = "num_experts" in config or "router_aux_loss_coef" in config
    fields = {
        "preset": "custom",
        "vocab_size": config.get("vocab_size", 6400),
        "hidden_size": config["hidden_size"],
        "num_layers": config["num_hidden_layers"],
        "num_heads": config.get("num_attention_heads", 8),
        "num_kv_heads": config.get("num_key_value_heads", 2),
        "intermediate_size": config.get("intermediate_size"),
        "max_seq_len": config.get("max_position_embeddings", 32768),
        "rope_theta": float(config.get("rope_theta", 1e6)),
        "rms_norm_eps": config.get("rms_norm_eps", 1e-6 if minimind3 else 1e-5),
        "qk_norm": any(name.endswith("self_attn.q_norm.weight") for name in state),
    }
    if config.get("use_moe"):
        balance = config.get("router_aux_loss_coef", 5e-4) if minimind3 else config.get("aux_loss_alpha", 0.1)
        fields["moe"] = {
            "enabled": True,
            "num_routed_experts": config.get("num_experts" if minimind3 else "n_routed_experts", 4),
            "num_shared_experts": 0 if minimind3 else config.get("n_shared_experts", 1),
            "top_k": config.get("num_experts_per_tok", 1 if minimind3 else 2),
            "norm_topk_prob": config.get("norm_topk_prob", True),
            "aux_loss_alpha": balance,
            "balance_over": "batch" if minimind3 else "sequence",
        }
    return model_config_from_dict(fields)


def model_from_state(state: dict[str, torch.Tensor], config: ModelConfig, source: str) -> MiniMindLM:
    """``MiniMindLM(config)`` holding ``state``; a file that does not fit says which names or shapes."""
    model = MiniMindLM(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state) - {TIED_KEY})
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: does not fit a {config.preset} model: missing {missing[:4]}, unexpected {unexpected[:4]}"
            " (choose the preset, or model fields, the weights were trained with)"
        )
    wrong = [f"{name} {tuple(state[name].shape)} vs {tuple(want.shape)}" for name, want in expected.items()
             if name in state and state[name].shape != want.shape]  # fmt: skip
    if wrong:
        raise ValueError(f"{source}: shapes do not fit a {config.preset} model: {', '.join(wrong[:3])}")
    if TIED_KEY in state and not torch.equal(state[TIED_KEY], state[EMBEDDING_KEY]):
        raise ValueError(f"{source}: lm_head.weight differs from the embedding; MiniMind ties them")
    model.load_state_dict({name: tensor.float() for name, tensor in state.items()}, strict=False)
    return model
