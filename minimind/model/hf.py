"""Hugging Face interop: a dense MiniMind model is a transformers ``LlamaForCausalLM`` (MiniMind2)
or, with QK-norm, a ``Qwen3ForCausalLM`` (minimind-3, the architecture it is aligned with); the
minimind-3 MoE is a ``Qwen3MoeForCausalLM``. Embeddings are tied in all three.

:func:`export_hf` writes config.json, model.safetensors, generation_config.json and the tokenizer
(with the chat template) so ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer`` load the
directory; :func:`import_hf` reads such a directory back. Parameter names are identical on both
sides, so no tensor is renamed. transformers itself is not needed for either direction.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from minimind.model.checkpoint import TIED_KEY, attach_adapter, load_model, model_config_from_dict
from minimind.model.lora import LoRALinear
from minimind.model.minimind import MiniMindLM
from minimind.model.mup import standard_state_dict

# model_type -> architecture: Llama has no QK-norm, Qwen3 has it (and otherwise the same layers);
# Qwen3-MoE is Qwen3 with routed experts (top-k, softmax router, no shared expert): minimind-3-moe.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def hf_model_type(config) -> str:
    """The transformers architecture of a model config, or a ValueError saying why there is none."""
    moe = config.moe
    if not moe.enabled:
        return "qwen3" if config.qk_norm else "llama"
    if not config.qk_norm or moe.num_shared_experts:
        raise ValueError(
            "an MoE model exports as Qwen3-MoE, which has QK-norm and no shared expert (minimind-3-moe); "
            f"this one has qk_norm={config.qk_norm} and {moe.num_shared_experts} shared expert(s)"
        )
    return "qwen3_moe"


def hf_config(model: MiniMindLM, bos_id: int = 1, eos_id: int = 2, pad_id: int = 0) -> dict:
    config = model.config
    model_type = hf_model_type(config)
    extra = {"use_sliding_window": False, "sliding_window": None} if model_type != "llama" else {"mlp_bias": False}
    if model_type == "qwen3_moe":
        extra |= {
            "num_experts": config.moe.num_routed_experts,
            "num_experts_per_tok": config.moe.top_k,
            "moe_intermediate_size": config.ffn_size,
            "norm_topk_prob": config.moe.norm_topk_prob,
            "router_aux_loss_coef": config.moe.aux_loss_alpha,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }
    return {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.rms_norm_eps,
        # transformers 4.x reads rope_theta, 5.x reads rope_parameters.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        **extra,
        "tie_word_embeddings": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
        "minimind_preset": config.preset,
    }


def export_hf(model: MiniMindLM, tokenizer, directory: str | Path) -> Path:
    """Write a transformers-loadable directory for a LoRA-merged model; experts one tensor each, as
    Qwen3-MoE checkpoints are published (transformers 5 fuses them on load)."""
    hf_model_type(model.config)
    if any(isinstance(module, LoRALinear) for module in model.modules()):
        raise ValueError("merge LoRA adapters before export (load_model(..., merge=True))")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {
        name: tensor.detach().float().contiguous().cpu()
        for name, tensor in standard_state_dict(model).items()  # μP's multipliers folded in
        if name != TIED_KEY
    }
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(model, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    (directory / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    generation = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "do_sample": True,
        "temperature": 0.85,
        "top_p": 0.85,
    }
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    tokenizer.save_pretrained(directory)
    return directory


def import_hf(directory: str | Path, device: str = "cpu") -> MiniMindLM:
    """Load a Llama, Qwen3 or Qwen3-MoE directory (e.g. one made by :func:`export_hf`) as a MiniMindLM."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") not in ARCHITECTURES:
        raise ValueError(
            f"{directory}/config.json: model_type {config.get('model_type')!r} is not one of {sorted(ARCHITECTURES)}"
        )
    if config.get("use_sliding_window"):
        raise ValueError(f"{directory}/config.json: sliding-window attention is not part of the MiniMind architecture")
    if not config.get("tie_word_embeddings", False):
        raise ValueError(f"{directory}/config.json: MiniMind ties input and output embeddings; this model does not")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ValueError(f"{directory}/config.json: biased projections are not part of the MiniMind architecture")
    heads = config["num_attention_heads"]
    if config.get("head_dim", config["hidden_size"] // heads) * heads != config["hidden_size"]:
        raise ValueError(f"{directory}/config.json: head_dim * heads must equal hidden_size")
    rope_theta = config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta", 10000.0))
    model_config = model_config_from_dict(
        {
            "preset": config.get("minimind_preset", "custom"),
            "vocab_size": config["vocab_size"],
            "hidden_size": config["hidden_size"],
            "num_layers": config["num_hidden_layers"],
            "num_heads": heads,
            "num_kv_heads": config.get("num_key_value_heads", heads),
            "intermediate_size": config["intermediate_size"],
            "max_seq_len": config.get("max_position_embeddings", 32768),
            "rope_theta": float(rope_theta),
            "rms_norm_eps": config.get("rms_norm_eps", 1e-6),
            "qk_norm": config["model_type"] != "llama",
            **({"moe": qwen3_moe_fields(config, directory)} if config["model_type"] == "qwen3_moe" else {}),
        }
    )
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(file)))
    state = split_fused_experts(state)
    state.pop(TIED_KEY, None)
    model = MiniMindLM(model_config).to(device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if name != TIED_KEY]
    if missing or unexpected:
        raise ValueError(f"{directory}: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def qwen3_moe_fields(config: dict, directory: Path) -> dict:
    """Our ``moe`` fields for a Qwen3-MoE config; what MiniMind's MoE cannot be is refused."""
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        raise ValueError(
            f"{directory}/config.json: every layer must be sparse (decoder_sparse_step 1, no mlp_only_layers)"
        )
    if config.get("moe_intermediate_size", config["intermediate_size"]) != config["intermediate_size"]:
        raise ValueError(f"{directory}/config.json: moe_intermediate_size must equal intermediate_size")
    return {
        "enabled": True,
        "num_routed_experts": config.get("num_experts", config.get("num_local_experts")),  # transformers 4 / 5
        "num_shared_experts": 0,
        "top_k": config["num_experts_per_tok"],
        "norm_topk_prob": config.get("norm_topk_prob", True),
        "aux_loss_alpha": config.get("router_aux_loss_coef", 5e-4),
        "balance_over": "batch",
    }


def split_fused_experts(state: dict) -> dict:
    """transformers 5 may save experts fused (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj``
    [E, H, I]); our layout (and the Hub's) is one ``experts.{e}.*_proj.weight`` per expert."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix, half = name[: -len("gate_up_proj")], tensor.shape[1] // 2
            for expert, fused in enumerate(tensor):
                out[f"{prefix}{expert}.gate_proj.weight"] = fused[:half].contiguous()
                out[f"{prefix}{expert}.up_proj.weight"] = fused[half:].contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for expert, weight in enumerate(tensor):
                out[f"{prefix}{expert}.down_proj.weight"] = weight.contiguous()
        else:
            out[name] = tensor
    return out


def is_hf_export(path: str | Path) -> bool:
    return (Path(path) / "config.json").exists()


def checkpoint_tokenizer(source: str | Path, given: str | Path | None = None) -> str | None:
    """The tokenizer to use with the model at ``source`` (a checkpoint, a run directory, or a Hugging Face
    export), as a path for :func:`~minimind.tokenizer.load_tokenizer` (None: the bundled one): ``given``
    (``--tokenizer``), else an export's own ``tokenizer.json``, else the training run's ``data.tokenizer`` (its
    ``config.yaml`` beside the checkpoint). A tokenizer other than the one the checkpoint records having
    trained with is refused: its ids mean other text, and the model would read and write nonsense."""
    import yaml

    from minimind import storage
    from minimind.config import ConfigError
    from minimind.model.checkpoint import META_FILE, checkpoint_location
    from minimind.tokenizer import load_tokenizer

    if not storage.is_uri(source) and is_hf_export(source):
        return str(given or source) if (given or (Path(source) / "tokenizer.json").exists()) else None
    location = checkpoint_location(source)
    meta = json.loads(storage.read_text(storage.join(location, META_FILE)))
    chosen, how = given, "--tokenizer"
    if chosen is None:
        run_config = storage.join(location.rsplit("/", 1)[0], "config.yaml")
        if storage.is_file(run_config):
            chosen = ((yaml.safe_load(storage.read_text(run_config)) or {}).get("data") or {}).get("tokenizer")
            how = f"the data.tokenizer of {run_config}"
    recorded = meta.get("tokenizer")
    if recorded:
        try:
            fingerprint = load_tokenizer(chosen).fingerprint
        except FileNotFoundError as error:
            message = f"{source}: its tokenizer, {how}, cannot be read here ({error}); give --tokenizer"
            raise ConfigError(message) from None
        if fingerprint != recorded:
            named = f"{chosen} ({how})" if chosen else "the bundled tokenizer"
            raise ConfigError(
                f"{source}: trained with tokenizer {recorded}, but {named} is {fingerprint}: its ids mean other "
                "text; give --tokenizer the tokenizer the run trained with (its data.tokenizer)"
            )
    return None if chosen is None else str(chosen)


def load_for_inference(source: str | Path, device: str = "cpu", adapter: str | Path | None = None) -> MiniMindLM:
    """An eval-mode model from a checkpoint, a run directory or a Hugging Face export, plus an
    optional LoRA adapter checkpoint applied on top."""
    model = import_hf(source, device) if is_hf_export(source) else load_model(source, device, merge=True)
    if adapter:
        attach_adapter(model, adapter)
    return model.eval().requires_grad_(False)
