"""What a sweep is: its objective (a metric or a weighted sum of metrics) and its plan, the run
configs of every trial (the space's base config, a trial's sampled values, the token budget).

Shipped to the trials (``tune.with_parameters``); nothing here talks to Ray.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from minimind.config import ConfigError, TrainConfig, apply_overrides, build_config
from minimind.train.compute import steps_per_epoch, tokens_per_step
from minimind.train.schedule import decay_steps
from minimind.tune.space import Budget, SearchSpace

# Metrics an objective can use, and which way is better.
METRIC_MODES = {
    "val_perplexity": "min",
    "val_loss": "min",
    "val_bits_per_byte": "min",
    "continuation_accuracy": "max",
    "continuation_loglik": "max",
    "reward_accuracy": "max",
    "reward_margin": "max",
}
TIME_ATTR = "tokens"  # trained tokens, counted by the loop and restored with its checkpoints
RUNG_ATTR = "budget_tokens"
"""Where a trial is against its budget and ASHA's rungs: the tokens its steps hold, padding included
(``step * tokens_per_step``), so a rung's evaluation step is known in advance; real ``tokens`` fall
short of it by the padding (in packed pretraining, one short block per epoch)."""
NO_TOKEN_LIMIT = 1e18  # rungs of trials that train by epochs (no budget.max_tokens)


def rung_milestones(budget: Budget) -> list[float]:
    """ASHA's rungs, in trained tokens: ``grace_tokens * reduction_factor**k`` below ``max_tokens``
    (none when the budget names neither ``grace_tokens`` nor ``eval_every_tokens``: trials are judged
    at their ends only)."""
    grace = budget.grace_tokens or budget.eval_every_tokens
    if not grace:
        return []
    limit = budget.max_tokens or NO_TOKEN_LIMIT
    return [m for m in (grace * budget.reduction_factor**k for k in range(64)) if m < limit]


@dataclass
class Objective:
    """One metric (its own direction), or a weighted sum of metrics that is maximised.

    ``val_perplexity`` | ``continuation_accuracy`` | ... or ``"continuation_accuracy=1,val_loss=-0.5"``.
    """

    spec: str
    weights: dict[str, float]
    mode: str

    @classmethod
    def parse(cls, spec: str) -> Objective:
        spec = spec.strip()
        if "=" not in spec:
            if spec not in METRIC_MODES:
                raise ConfigError(f"objective: unknown metric {spec!r}; choose from {', '.join(METRIC_MODES)}")
            return cls(spec, {spec: 1.0}, METRIC_MODES[spec])
        weights = {}
        for part in spec.split(","):
            name, _, weight = part.partition("=")
            name = name.strip()
            if name not in METRIC_MODES:
                choices = ", ".join(METRIC_MODES)
                raise ConfigError(f"objective: unknown metric {name!r} in {spec!r}; choose from {choices}")
            try:
                weights[name] = float(weight)
            except ValueError:
                raise ConfigError(f"objective: {part!r} needs a numeric weight, as in 'val_loss=-1'") from None
        return cls(spec, weights, "max")

    def __call__(self, metrics: dict) -> float | None:
        """The objective of a metrics row, or None when the row has no evaluation."""
        if not all(name in metrics for name in self.weights):
            return None
        value = sum(weight * float(metrics[name]) for name, weight in self.weights.items())
        return value if math.isfinite(value) else None

    def needs_eval(self) -> bool:
        return True  # every metric above comes from the held-out evaluation


@dataclass
class SweepPlan:
    """What every trial of a sweep shares: shipped to the trials with ``tune.with_parameters``."""

    name: str
    sweep_dir: str
    space: SearchSpace
    objective: Objective

    def __post_init__(self) -> None:
        if self.space.budget.durations_epochs and not self.space.budget.durations_tokens:
            self.space = durations_in_tokens(self.space)

    def trial_dir(self, trial_id: str) -> str:
        return f"{self.sweep_dir}/trials/{trial_id}"

    def stage_dirs(self, trial_id: str) -> list[str]:
        """Run directories of a trial's stages: the trial's own, then one per later stage inside it."""
        first = self.trial_dir(trial_id)
        return [first, *(f"{first}/{later.name}" for later in self.space.then)]

    def judged_dir(self, trial_id: str) -> str:
        """The run whose evaluations judge the trial: its last stage's."""
        return self.stage_dirs(trial_id)[-1]

    def stage_configs(self, params: dict[str, Any], run_dir: str) -> list[TrainConfig]:
        """Run configs of a trial's stages, each later one starting from the previous one's weights."""
        configs = [self.trial_config(params, run_dir)]
        for index, later in enumerate(self.space.then, start=1):
            raw = apply_overrides(later.base, self.space.stage_params(params, index))
            previous = configs[-1].checkpoint.dir
            overrides = {"checkpoint.dir": f"{run_dir}/{later.name}", "checkpoint.init_from": previous}
            configs.append(build_config(raw, overrides))
        return configs

    def trial_config(self, params: dict[str, Any], run_dir: str | None = None) -> TrainConfig:
        """The run config of a trial's first stage: the base config, its sampled values, and the token budget."""
        raw = apply_overrides(self.space.base, self.space.stage_params(params, 0))
        config = build_config(raw)
        budget = self.space.budget
        step_tokens = tokens_per_step(config)
        overrides: dict[str, Any] = {"checkpoint.dir": run_dir}
        if budget.max_tokens:
            steps = duration_steps(budget.max_tokens, step_tokens)
            overrides["optim.max_steps"] = min(steps, config.optim.max_steps or steps)
        if budget.eval_every_tokens:
            overrides["eval.every_steps"] = max(1, round(budget.eval_every_tokens / step_tokens))
            # A restored trial continues from about its last evaluation.
            overrides["checkpoint.every_steps"] = overrides["eval.every_steps"]
        if budget.durations_tokens:
            overrides.update(duration_evaluations(config, budget.durations_tokens, step_tokens))
        # Evaluated and saved where each rung is reached (its cooldown branch too, under WSD), so ASHA
        # judges every trial at the same budget and a trial paused there resumes from that step.
        last = overrides.get("optim.max_steps") or config.optim.max_steps
        at_rungs = [steps for steps in rung_steps(budget, step_tokens) if not last or steps < last]
        overrides["eval.at_steps"] = sorted(set(overrides.get("eval.at_steps", config.eval.at_steps)) | set(at_rungs))
        overrides["checkpoint.at_steps"] = sorted(set(config.checkpoint.at_steps) | set(at_rungs))
        return build_config(raw, overrides)

    def check(self) -> None:
        """Refuse a sweep whose trials could not be judged, before anything starts."""
        if self.space.budget.durations_tokens and self.space.then:
            raise ConfigError("budget.durations_tokens: durations apply to one-stage sweeps (this one has then:)")
        baseline = self.stage_configs(self.space.baseline(), "unused")[-1]
        for param, value, values in self._one_change_each():  # what only a sampled trial would hit (its batch)
            try:
                self.stage_configs(values, "unused")
            except ConfigError as error:
                where = f"{self.space.path}:{param.line}: params.{param.name} = {value!r}"
                raise ConfigError(f"{where}: a trial with it would be refused: {error}") from None
        if self.objective.needs_eval() and not baseline.eval.enabled:
            raise ConfigError(
                f"eval: the objective {self.objective.spec!r} needs held-out data; set eval.val_fraction or "
                f"eval.val_files (in the space's overrides or on the command line)"
            )
        if baseline.stage == "dpo" and any(m.startswith(("val_", "continuation_")) for m in self.objective.weights):
            raise ConfigError(f"objective: DPO trials report reward_accuracy/reward_margin, not {self.objective.spec}")
        if baseline.stage != "dpo" and any(m.startswith("reward_") for m in self.objective.weights):
            raise ConfigError(f"objective: only DPO trials report {self.objective.spec}")

    def _one_change_each(self):
        """The baseline with one parameter moved to each of its choices, or each end of its range."""
        baseline = self.space.baseline()
        for param in self.space.params:
            if param.name not in baseline:
                continue  # a conditional one that does not apply to the baseline
            ends = param.choices if param.kind == "choice" else [param.low, param.high]
            for value in ends:
                value = int(value) if param.integer else value
                if value != baseline[param.name]:
                    yield param, value, {**baseline, param.name: value}


def rung_steps(budget: Budget, tokens_per_step: float) -> list[int]:
    """The steps at which a trial of ``tokens_per_step`` reaches each of ASHA's rungs (with
    ``budget.max_tokens``; a trial that trains by epochs is judged at its own evaluations)."""
    if not budget.max_tokens:
        return []
    return [duration_steps(milestone, tokens_per_step) for milestone in rung_milestones(budget)]


def duration_steps(duration_tokens: float, tokens_per_step: float) -> int:
    """Optimizer steps that train at least ``duration_tokens``."""
    return max(1, math.ceil(duration_tokens / tokens_per_step))


def epoch_tokens(config: TrainConfig) -> int:
    """Tokens (padding included, as budgets count them) of one epoch of ``config``'s run over its data."""
    return steps_per_epoch(config) * tokens_per_step(config)


def durations_in_tokens(space: SearchSpace) -> SearchSpace:
    """``space`` with its epoch durations (``budget.durations_epochs``) as ``budget.durations_tokens``: the
    tokens of that many epochs of the baseline trial's data (opened here, once; a trial of another batch size
    is scored within a step of the same epochs). Its recipe trains the longest number of epochs."""
    epochs = space.budget.durations_epochs
    longest = {"optim.epochs": max(epochs)}
    base = apply_overrides(space.base, longest)
    config = build_config(apply_overrides(base, space.stage_params(space.baseline(), 0)))
    try:
        per_epoch = epoch_tokens(config)
    except (OSError, ValueError) as error:
        message = f"params.optim.epochs: the tokens of an epoch of the data could not be counted: {error}"
        raise ConfigError(message) from None
    durations = [float(count * per_epoch) for count in epochs]
    budget = dataclasses.replace(space.budget, durations_tokens=durations, max_tokens=durations[-1])
    return dataclasses.replace(space, base=base, budget=budget)


def duration_evaluations(config: TrainConfig, durations_tokens: list[float], tokens_per_step: float) -> dict:
    """Overrides that evaluate a trial at each shorter duration ``D`` (in steps): at the stable end of a
    ``D``-step run, by a cooldown branch that is that run's decay (``eval.cooldown_durations``), so the
    reading is the shorter run's end. Unless set, ``eval.cooldown_fraction`` (the rungs' branches) is
    ``decay_fraction / (1 - decay_fraction)``, so those too are about the decay of a run ending there."""
    if config.optim.schedule != "wsd":
        raise ConfigError(
            "budget.durations_tokens: a trial is evaluated at shorter durations by cooldown branches of a warmup-"
            f"stable-decay run; set optim.schedule: wsd in the space's overrides (it is {config.optim.schedule!r})"
        )
    fraction = config.eval.cooldown_fraction
    if not fraction:
        decay = config.optim.decay_fraction
        fraction = decay / (1 - decay) if decay < 1 else 1.0
    durations, at_steps = [], []
    for duration in durations_tokens[:-1]:
        steps = duration_steps(duration, tokens_per_step)
        start = steps - decay_steps(steps, config.optim)
        if start < config.optim.warmup_steps:
            raise ConfigError(
                f"budget.durations_tokens: {duration:g} tokens are {steps} steps of {tokens_per_step:,} tokens; the "
                f"cooldown branch ending there would start at step {start}, inside the warmup "
                f"(optim.warmup_steps {config.optim.warmup_steps}), and a run that short has no stable phase to "
                "branch from: drop that duration or shorten the warmup"
            )
        durations.append(steps)
        at_steps.append(start)
    return {
        "eval.cooldown_fraction": fraction,
        "eval.cooldown_durations": sorted(set(config.eval.cooldown_durations) | set(durations)),
        "eval.at_steps": sorted(set(config.eval.at_steps) | set(at_steps)),
    }
