"""Model weights on disk: fp32 safetensors plus a small JSON description of the architecture.

A checkpoint directory holds ``model.safetensors`` (full weights, tied embedding stored once) and
``model.json`` (model config, LoRA config if any, the base checkpoint a LoRA adapter applies to).
A LoRA checkpoint stores only ``adapter.safetensors`` when its base lives elsewhere. A *run*
directory holds ``step_N`` checkpoint folders and a ``latest`` file naming the newest one;
:func:`resolve_checkpoint` accepts either.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minimind import storage
from minimind.config import LoraConfig, ModelConfig, build_config, build_model_config, config_to_dict
from minimind.model.lora import adapter_state_dict, apply_lora, base_state_dict, merge_lora
from minimind.model.minimind import MiniMindLM

WEIGHTS_FILE = "model.safetensors"
ADAPTER_FILE = "adapter.safetensors"
META_FILE = "model.json"
TIED_KEY = "lm_head.weight"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint or run directory (newest checkpoint of the run).

    A URI (``s3://``...) comes back as this machine's cached copy of the checkpoint it stands for
    (checkpoints never change once written)."""
    location = checkpoint_location(path)
    return storage.cached_copy(location, "checkpoint") if storage.is_uri(location) else Path(location)


def checkpoint_location(path: str | Path) -> str:
    """The checkpoint (a local path or a URI, as ``path`` is) that a checkpoint or run directory stands for:
    itself, the checkpoint the run's ``latest`` names, or, for a run whose last pointer update was cut
    short, its newest complete checkpoint."""
    path = str(path).rstrip("/")
    if storage.is_file(storage.join(path, META_FILE)):
        return path
    latest = storage.join(path, "latest")
    if storage.is_file(latest):
        return storage.join(path, storage.read_text(latest).strip())
    steps = [name for name in storage.list_dir(path) if name.startswith("step_")]
    complete = [name for name in steps if storage.is_file(storage.join(path, name, META_FILE))]
    if complete:
        return storage.join(path, complete[-1])
    raise FileNotFoundError(f"{path} is neither a checkpoint (no {META_FILE}) nor a run directory (no 'latest')")


def save_model(
    model: MiniMindLM,
    directory: str | Path,
    lora: LoraConfig | None = None,
    base: str | None = None,
    extra: dict | None = None,
    weights: bool = True,
) -> None:
    """Write weights and ``model.json`` into ``directory`` (which must exist).

    With ``lora`` and a ``base`` checkpoint, only the adapter is written: the base is unchanged.
    ``weights=False`` writes ``model.json`` alone (the weights live elsewhere, e.g. in shards).
    """
    directory = Path(directory)
    # Pin the base to its exact checkpoint folder, not a run directory whose 'latest' moves on.
    base = str(resolve_checkpoint(base).resolve()) if (lora and base) else None
    meta = {
        "model": config_to_dict(model.config),
        "lora": config_to_dict(lora) if lora else None,
        "base": base,
        **(extra or {}),
    }
    if lora and weights:
        save_file(_fp32(adapter_state_dict(model)), str(directory / ADAPTER_FILE))
    if not base and weights:
        weights = base_state_dict(model)
        weights.pop(TIED_KEY, None)
        save_file(_fp32(weights), str(directory / WEIGHTS_FILE))
    (directory / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")


def read_meta(path: str | Path) -> dict:
    return json.loads((resolve_checkpoint(path) / META_FILE).read_text(encoding="utf-8"))


def load_model(
    path: str | Path, device: str | torch.device = "cpu", merge: bool = False, lora_trainable: bool = False
) -> MiniMindLM:
    """Rebuild a model from a checkpoint (or run) directory.

    LoRA checkpoints come back with their adapters attached (frozen unless ``lora_trainable``),
    or folded into plain weights with ``merge=True``.
    """
    directory = resolve_checkpoint(path)
    meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    weights_file = directory / (ADAPTER_FILE if meta.get("base") else WEIGHTS_FILE)
    if not weights_file.exists() and meta.get("sharded"):
        raise FileNotFoundError(
            f"{directory} holds only {meta['sharded']} shards; "
            f"write its weights with `minimind consolidate {directory}`"
        )
    if meta.get("base"):
        model = load_model(meta["base"], device, merge=True)
    else:
        model = MiniMindLM(model_config_from_dict(meta["model"])).to(device)
        load_weights(model, directory / WEIGHTS_FILE)
    if meta.get("lora"):
        lora = build_config({"lora": meta["lora"]}).lora
        apply_lora(model, lora)
        load_adapter(model, directory / ADAPTER_FILE)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(lora_trainable and "lora_" in name)
        if merge:
            merge_lora(model)
    return model


def attach_adapter(model: MiniMindLM, adapter_checkpoint: str | Path) -> MiniMindLM:
    """Apply a LoRA checkpoint's adapters to ``model`` (any base of the same architecture), in place."""
    directory = resolve_checkpoint(adapter_checkpoint)
    meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    if not meta.get("lora"):
        raise ValueError(f"{directory} is not a LoRA checkpoint (no lora section in {META_FILE})")
    trained_on = {k: v for k, v in meta["model"].items() if k != "preset"}
    if trained_on != {k: v for k, v in config_to_dict(model.config).items() if k != "preset"}:
        raise ValueError(f"{directory} was trained on a different architecture than this model")
    apply_lora(model, build_config({"lora": meta["lora"]}).lora)
    load_adapter(model, directory / ADAPTER_FILE)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def load_weights(model: MiniMindLM, file: str | Path) -> None:
    """Load full (un-wrapped) weights into ``model``; every parameter must be present."""
    state = load_file(str(file), device=str(model.lm_head.weight.device))
    expected = set(base_state_dict(model)) - {TIED_KEY}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"{file}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    renamed = {}
    wrapped = {name.replace(".base.", "."): name for name in model.state_dict()}
    for name, tensor in state.items():
        renamed[wrapped.get(name, name)] = tensor
    model.load_state_dict(renamed, strict=False)


def load_adapter(model: MiniMindLM, file: str | Path) -> None:
    """Load LoRA adapter weights into a model that already has adapters attached."""
    adapter = load_file(str(file), device=str(model.lm_head.weight.device))
    expected = set(adapter_state_dict(model))
    if expected != set(adapter):
        raise ValueError(
            f"{file}: adapter weights do not match the model's LoRA layout "
            f"(missing {sorted(expected - set(adapter))[:3]}, unexpected {sorted(set(adapter) - expected)[:3]})"
        )
    model.load_state_dict(adapter, strict=False)


def model_config_from_dict(data: dict) -> ModelConfig:
    return build_model_config(data)


def _fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().float().contiguous().cpu() for name, tensor in state.items()}
