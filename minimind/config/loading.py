"""Dataclasses <-> plain dicts <-> YAML <-> dotted overrides.

A raw config is a nested dict. Overrides (``{"optim.lr": 3e-4}`` from the command line or a Tune
``param_space``) are applied to that dict, then :func:`build_config` turns it into typed
dataclasses: ``model.preset`` expands to the preset's fields first, explicit model fields win,
values are coerced to the declared types and unknown keys are refused with the valid choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from minimind import storage
from minimind.config.presets import preset_fields
from minimind.config.schema import ConfigError, ModelConfig, TrainConfig


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key repeated in one mapping: PyYAML keeps the last value silently, and in
    a recipe, a space or an experiment (two steps of one name) that hides a mistake."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                line = key_node.start_mark.line + 1
                if key_node.value in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key_node.value!r} appears twice (first on line {first[key_node.value]})",
                        key_node.start_mark)  # fmt: skip
                first[key_node.value] = line
        return super().construct_mapping(node, deep)


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` that refuses repeated keys (:class:`StrictLoader`)."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a local file or from object storage (``s3://…/best.yaml``)."""
    if storage.is_uri(path):
        text = storage.read_text(path)
    else:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    try:
        raw = safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(yaml_error_message(path, error)) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}:1: the top level must be a mapping, got {type(raw).__name__}")
    return raw


def yaml_error_message(path: str | Path, error: yaml.YAMLError) -> str:
    """``FILE:LINE: not valid YAML: what`` from PyYAML's error (its marks count lines from 0)."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    line = f":{mark.line + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    return f"{path}{line}: not valid YAML: {problem}" + (f" ({context})" if context else "")


def load_yaml_document(path: str, what: str, top_level: str = "") -> tuple[dict[str, Any], Any, str]:
    """A YAML mapping file (local or object storage), its composed node tree (for errors naming lines) and
    its text.

    ``what`` names the file in a read error ("the search space"); ``top_level`` says what the mapping holds,
    for the error when the file is not one. Raises :class:`ConfigError` with ``FILE[:LINE]: ...``."""
    try:
        text = storage.read_text(path)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read {what} ({error.strerror or error})") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(yaml_error_message(path, error)) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}:1: the top level must be a mapping{top_level}")
    return raw, root, text


def yaml_child(node, key: str):
    """The value node under ``key`` of a composed YAML mapping node (``yaml.compose``), or None."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.value == key:
                return value_node
    return None


def yaml_key_lines(node) -> dict[str, int]:
    """1-based line of each key of a composed YAML mapping node (``{}`` for anything else)."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {key_node.value: key_node.start_mark.line + 1 for key_node, _ in node.value}


def parse_override_args(args: list[str]) -> dict[str, Any]:
    """``["--optim.lr", "3e-4", "--lora.enabled=true"]`` -> ``{"optim.lr": 3e-4, "lora.enabled": True}``."""
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --dotted.path VALUE, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, text = key.split("=", 1)
        else:
            if index + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value")
            index += 1
            text = args[index]
        overrides[key.replace("-", "_")] = yaml.safe_load(text)
        index += 1
    return overrides


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each dotted key set; paths are checked in :func:`build_config`."""
    merged = _deep_copy(raw)
    for dotted, value in overrides.items():
        node = merged
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return merged


def build_config(raw: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Typed, validated :class:`TrainConfig` from a raw dict plus dotted overrides."""
    merged = apply_overrides(raw or {}, overrides or {})
    model = merged.get("model")
    if model is None or isinstance(model, dict):
        merged["model"] = _with_preset(model or {})
    config = _from_dict(TrainConfig, merged, "")
    return config.validate()


def build_model_config(raw: dict[str, Any]) -> ModelConfig:
    """A validated :class:`ModelConfig` on its own (e.g. a checkpoint's architecture): checked
    without a run config around it, whose defaults (``data.seq_len``) say nothing about the model."""
    config = _from_dict(ModelConfig, _with_preset(raw), "model")
    config.validate("model")
    return config


def _with_preset(model: dict[str, Any]) -> dict[str, Any]:
    """The preset's fields under the given ones."""
    return _merge_dicts(preset_fields(model.get("preset", TrainConfig().model.preset)), dict(model))


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    return build_config(load_yaml(path) if path else {}, overrides)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_yaml(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True), encoding="utf-8")


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _deep_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_deep_copy(item) for item in value]
    return value


def _merge_dicts(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = _deep_copy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """An instance of the dataclass ``cls`` from a mapping, each value checked against its field's type
    (nested dataclasses too); errors name the dotted field under ``path``."""
    return _from_dict(cls, data, path)


def _from_dict(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [key for key in data if key not in fields]
    if unknown:
        key = unknown[0]
        where = f"{path}.{key}" if path else key
        renamed = getattr(cls, "RENAMED", {})
        if key in renamed:
            raise ConfigError(f"{where}: {renamed[key]}")
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where}: unknown key{hint} (valid: {', '.join(fields)})")
    values = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        values[key] = _coerce(hints[key], value, where)
    return cls(**values)


def _coerce(annotation: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if value is None:
            return None
        errors = []
        for option in options:
            try:
                return _coerce(option, value, path)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(annotation):
        return _from_dict(annotation, value, path)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(item_type, item, f"{path}[{i}]") for i, item in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(value)
    if annotation is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported field type {annotation!r}")
