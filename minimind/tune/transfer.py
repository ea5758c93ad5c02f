"""Tune small, train big: a sweep over a μP proxy that writes the target run's recipe.

A space that names a ``target:`` recipe (a μP model, ``model.parametrization: mup``) runs its trials
on a *proxy*: the same model at the target's base width (``model.mup_base_width``), or at the width
the space's overrides give it. Under μP the learning rate, init and schedule tuned at the base width
hold at the target's (``docs/benchmarks.md``, learning-rate transfer), so the best trial's values go
into ``best-target.yaml`` as they are, with two exceptions:

- what sizes the run stays the target's: its batch (``optim.batch_size``, ``grad_accum_steps``,
  ``distributed.num_workers``, ``data.seq_len``), its length (``optim.max_steps``, ``epochs``,
  ``warmup_steps``) and its model's shape;
- where the target's batch (in tokens per step) differs from the proxy's, the learning rate follows
  the square-root rule for Adam (Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive
  Gradient Algorithms"): ``lr * sqrt(B_target / B_proxy)``. The rule holds up to the critical batch
  size; a factor far from 1 is flagged, and tuning the proxy at the target's batch avoids it.

What transfers: the searched fields and the space's overrides under ``optim``, ``model`` (not its
shape), ``objective`` and ``lora``; data, evaluation and logging fields describe the proxy's runs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from minimind.config import ConfigError, ModelConfig, TrainConfig, apply_overrides, build_config
from minimind.train.compute import model_flops_per_token, run_cost, tokens_per_step

TARGET_KEYS = ("recipe", "overrides", "tokens")
TRANSFERRED_SECTIONS = ("optim", "model", "objective", "lora")
KEPT_FIELDS = (
    "optim.batch_size",
    "optim.grad_accum_steps",
    "optim.max_steps",
    "optim.epochs",
    "optim.warmup_steps",
    "distributed.num_workers",
    "data.seq_len",
)
"""Fields that size the run: the target keeps its own."""
WIDTH_FIELDS = ("hidden_size", "intermediate_size", "preset")
"""Model fields in which the proxy may differ from the target (μP transfers across width)."""
LR_FLAG_FACTOR = 4.0
"""A square-root factor beyond this (a batch 16x the proxy's, or a 16th) is flagged in the header."""


@dataclass
class Target:
    """The run a proxy sweep tunes for."""

    recipe: str
    base: dict[str, Any]
    """The target recipe with its overrides (and the stage's defining fields): ``best-target.yaml``'s start."""
    tokens: float | None = None
    """One target run's length in tokens, when its recipe trains by epochs of a corpus not at hand."""
    proxy_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """What the space's ``overrides`` (and the command line) set for the proxy, by dotted field; those
    that transfer go into the target with the searched values."""


def proxy_width_overrides(target_config: TrainConfig) -> dict[str, Any]:
    """The proxy's model fields when the space leaves them to the target: its base width (the
    SwiGLU width scaled with it when the target sets one)."""
    model = target_config.model
    base = model.mup_base_width
    overrides: dict[str, Any] = {"model.hidden_size": base}
    if model.intermediate_size is not None:
        scaled = model.intermediate_size * base / model.hidden_size
        if not scaled.is_integer():
            raise ConfigError(
                f"model.intermediate_size {model.intermediate_size} does not scale to the base width {base} "
                f"(x {base}/{model.hidden_size} = {scaled:g}); set the proxy's model.intermediate_size in the "
                "space's overrides"
            )
        overrides["model.intermediate_size"] = int(scaled)
    return overrides


def check_target(target: TrainConfig) -> None:
    """Refuse a target that no proxy can be tuned for, naming the field."""
    if target.model.parametrization != "mup":
        raise ConfigError(
            "model.parametrization: a target is tuned through a μP proxy, and its recipe is "
            f"{target.model.parametrization!r}; under the standard parametrization the best lr moves with width. "
            "Set model.parametrization: mup and model.mup_base_width in the target recipe"
        )
    if target.model.mup_base_width is None or target.model.mup_base_width >= target.model.hidden_size:
        raise ConfigError(
            f"model.mup_base_width: the target's ({target.model.mup_base_width}) must be set below its hidden size "
            f"{target.model.hidden_size}: it is the width the proxy is tuned at"
        )


def check_transfer(proxy: TrainConfig, target: TrainConfig) -> None:
    """Refuse a proxy whose tuned values would not hold at the target, naming the field."""
    check_target(target)
    if proxy.model.parametrization != "mup" or proxy.model.mup_base_width != target.model.mup_base_width:
        raise ConfigError(
            f"model.mup_base_width: the proxy ({proxy.model.parametrization}, base "
            f"{proxy.model.mup_base_width}) and the target (mup, base {target.model.mup_base_width}) must share "
            "one μP base width, or the tuned values mean different things"
        )
    proxy_fields, target_fields = _shape(target.model, proxy.model), _shape(target.model, target.model)
    for name in sorted(proxy_fields):
        if proxy_fields[name] != target_fields[name]:
            raise ConfigError(
                f"model.{name}: the proxy has {proxy_fields[name]!r} and the target {target_fields[name]!r}; μP "
                f"transfers across width ({', '.join(WIDTH_FIELDS[:2])}) only"
            )
    if proxy.stage != target.stage:
        raise ConfigError(f"stage: the proxy trains {proxy.stage!r} and the target {target.stage!r}")


def _shape(target: ModelConfig, model: ModelConfig) -> dict[str, Any]:
    """The model's fields but those the target's transfer crosses: width under μP, and depth too under
    depth transfer (``model.depth_transfer``)."""
    crossed = (*WIDTH_FIELDS, "num_layers") if getattr(target, "depth_transfer", False) else WIDTH_FIELDS
    return {name: value for name, value in dataclasses.asdict(model).items() if name not in crossed}


@dataclass
class TransferredRecipe:
    """``best-target.yaml``'s content, and what the report says of it."""

    raw: dict[str, Any]
    config: TrainConfig
    notes: list[str]
    """How each value was obtained, in words (the file's header and the report)."""


def transfer(target: Target, proxy: TrainConfig, settings: dict[str, Any]) -> TransferredRecipe:
    """The target recipe with the proxy's tuned ``settings`` (dotted field -> value: the best trial's
    searched values and the space's overrides), the learning rate scaled to the target's batch."""
    target_config = build_config(target.base)
    carried = {
        name: value
        for name, value in settings.items()
        if name.split(".", 1)[0] in TRANSFERRED_SECTIONS
        and name not in KEPT_FIELDS
        and not (name.startswith("model.") and name.split(".", 1)[1] in WIDTH_FIELDS)
    }
    proxy_batch, target_batch = tokens_per_step(proxy), tokens_per_step(target_config)
    factor = math.sqrt(target_batch / proxy_batch)
    lr = proxy.optim.lr * factor
    carried["optim.lr"] = float(f"{lr:.4g}")
    notes = [
        f"optim.lr {carried['optim.lr']:.4g}: the proxy's {proxy.optim.lr:.4g} x sqrt({target_batch:,} / "
        f"{proxy_batch:,} tokens per step) = x {factor:.3g} (square-root rule for Adam; Malladi et al. 2022)"
    ]
    if not 1 / LR_FLAG_FACTOR <= factor <= LR_FLAG_FACTOR:
        notes.append(
            f"caution: the target's batch is {target_batch / proxy_batch:.3g}x the proxy's; the square-root rule "
            "holds only below the critical batch size, so tune the proxy nearer the target's batch "
            "(optim.batch_size, optim.grad_accum_steps or data.seq_len in the space's overrides) to rely on it"
        )
    others = sorted(name for name in carried if name != "optim.lr")
    if others:
        notes.append("from the proxy as tuned: " + ", ".join(f"{name} {carried[name]!r}" for name in others))
    kept = sorted(name for name in settings if name in KEPT_FIELDS)
    if kept:
        notes.append("the target's own (they size its run): " + ", ".join(kept))
    raw = apply_overrides(target.base, carried)
    return TransferredRecipe(raw, build_config(raw), notes)


@dataclass
class TransferCost:
    """The sweep's training FLOPs against one target run's."""

    sweep_flops: float
    proxy_flops_per_token: float
    target_flops_per_token: float
    target_tokens: float | None
    how: str

    @property
    def target_flops(self) -> float | None:
        return None if self.target_tokens is None else self.target_tokens * self.target_flops_per_token

    @property
    def fraction(self) -> float | None:
        return None if not self.target_flops else self.sweep_flops / self.target_flops


def transfer_cost(target: Target, trial_configs_and_tokens: list[tuple[TrainConfig, float]]) -> TransferCost:
    """The sweep's FLOPs (each trial's tokens, its cooldown branches' included, at its model's FLOPs
    per token) against one run of the target (``target.tokens``, else the recipe's own length)."""
    target_config = build_config(target.base)
    per_trial = [(model_flops_per_token(config), tokens) for config, tokens in trial_configs_and_tokens]
    sweep_flops = sum(per_token * tokens for per_token, tokens in per_trial)
    proxy_per_token = per_trial[0][0] if per_trial else math.nan
    if target.tokens is not None:
        tokens, how = target.tokens, "target.tokens in the space"
    else:
        try:
            cost = run_cost(target_config)
            tokens, how = float(cost.tokens), f"the target recipe's length: {cost.how}"
        except (OSError, ValueError) as error:  # its corpus is not on this machine
            tokens, how = None, f"unknown ({error}); give target.tokens in the space"
    return TransferCost(sweep_flops, proxy_per_token, model_flops_per_token(target_config), tokens, how)
