"""A Ray Tune sweep: every Ray Tune touchpoint of the project is here.

Driver side, :func:`build_tuner` assembles a ``Tuner``:

- the trainable is a Tune *function*, :func:`run_trial`, that launches one Ray Train
  ``TorchTrainer`` per trial (Train V2 runs are not Tune trainables). Its run directory is
  ``SWEEP/trials/<trial id>``, so a restored trial resumes its own run from its last checkpoint;
- ``OptunaSearch`` (TPE, seeded) samples the search space define-by-run, the recipe's own values
  enqueued first as the baseline trial; ``ConcurrencyLimiter`` runs as many trials at once as the
  cluster has CPUs/GPUs for their workers;
- ``ASHAScheduler`` stops the worst trials at rungs measured in trained *tokens* (not Tune's
  ``training_iteration``, which restarts when a sweep is restored), so trials with different
  batches are compared at equal amounts of data.

Worker side, :class:`ObjectiveReport` (a Ray Train callback) forwards each evaluation of rank 0 to
Tune with the sweep's ``objective`` added. Each trial records what it ran and how it ended in
``trials/<id>/trial.json`` next to the run's ``metrics.jsonl``; the report is built from those
files, so it can be written for an interrupted sweep too.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from minimind.config import ConfigError, TrainConfig, apply_overrides, build_config
from minimind.train.distributed import build_trainer, paths_for_workers
from minimind.tune.space import SearchSpace

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
NO_TOKEN_LIMIT = 1e18  # trials end on their own budget; ASHA only stops them early


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

    def trial_dir(self, trial_id: str) -> str:
        return f"{self.sweep_dir}/trials/{trial_id}"

    def trial_config(self, params: dict[str, Any], run_dir: str | None = None) -> TrainConfig:
        """The run config of a trial: the base config, its sampled values, and the token budget."""
        raw = apply_overrides(self.space.base, params)
        config = build_config(raw)
        budget = self.space.budget
        optim, workers = config.optim, config.distributed.num_workers
        tokens_per_step = optim.batch_size * optim.grad_accum_steps * workers * config.data.seq_len
        overrides: dict[str, Any] = {"checkpoint.dir": run_dir}
        if budget.max_tokens:
            steps = max(1, math.ceil(budget.max_tokens / tokens_per_step))
            overrides["optim.max_steps"] = min(steps, config.optim.max_steps or steps)
        if budget.eval_every_tokens:
            overrides["eval.every_steps"] = max(1, round(budget.eval_every_tokens / tokens_per_step))
            # A restored trial continues from about its last evaluation.
            overrides["checkpoint.every_steps"] = overrides["eval.every_steps"]
        return build_config(raw, overrides)

    def check(self) -> None:
        """Refuse a sweep whose trials could not be judged, before anything starts."""
        baseline = self.trial_config(self.space.baseline(), "unused")
        if self.objective.needs_eval() and not baseline.eval.enabled:
            raise ConfigError(
                f"eval: the objective {self.objective.spec!r} needs held-out data; set eval.val_fraction or "
                f"eval.val_files (in the space's overrides or on the command line)"
            )
        if baseline.stage == "dpo" and any(m.startswith(("val_", "continuation_")) for m in self.objective.weights):
            raise ConfigError(f"objective: DPO trials report reward_accuracy/reward_margin, not {self.objective.spec}")
        if baseline.stage != "dpo" and any(m.startswith("reward_") for m in self.objective.weights):
            raise ConfigError(f"objective: only DPO trials report {self.objective.spec}")


# -- inside a trial -----------------------------------------------------------------------------


class ObjectiveReport(TuneReportCallback):
    """Forwards rank 0's evaluations to Tune with the sweep's objective (others are not results)."""

    def __init__(self, objective: Objective):
        super().__init__()
        self.objective = objective

    def after_report(self, run_context, metrics, checkpoint):
        value = self.objective(metrics[0])
        if value is not None:
            super().after_report(run_context, [{**metrics[0], "objective": value}], checkpoint)


class TrialFailed(RuntimeError):
    """A trial's training failed; the message is the one-line reason the report shows."""


def failure_reason(error: BaseException) -> str:
    """One line saying why a trial's Train run failed: NaN/inf loss, out of memory, or the last error line."""
    text = str(error)
    found = re.search(r"NonFiniteLoss: (.+)", text)
    if found:
        return found.group(1).split(" (the last saved")[0].split("; stopping")[0].strip()
    if re.search(r"OutOfMemoryError|out of memory|MemoryError", text):
        line = next(ln for ln in text.splitlines() if re.search(r"OutOfMemoryError|out of memory|MemoryError", ln))
        return f"out of memory: {line.strip()[:300]}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


class TrialFile:
    """``trials/<id>/trial.json``: the trial's parameters, and how and when it ended."""

    def __init__(self, run_dir: str):
        self.path = Path(run_dir) / "trial.json"

    def read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def write(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(record, indent=1))
        os.replace(temporary, self.path)


def run_trial(params: dict, plan: SweepPlan) -> None:
    """Tune's function trainable: one Ray Train run of the trial's config, to its end."""
    trial_id = tune.get_context().get_trial_id()
    run_dir = plan.trial_dir(trial_id)
    started = time.time()
    trial_file = TrialFile(run_dir)
    record = trial_file.read()  # a restored trial keeps its first attempt's wall time
    record.setdefault("started_at", started)
    record["attempt_started_at"] = started
    record.update(
        trial_id=trial_id, params=params, baseline=params == plan.space.baseline(), status="running", reason=None
    )
    attempt_start = record.get("wall_seconds", 0.0)
    trial_file.write(record)
    try:
        config = paths_for_workers(plan.trial_config(params, run_dir))
        build_trainer(config, callbacks=[ObjectiveReport(plan.objective)]).fit()
    except Exception as error:  # the trial fails; the sweep goes on
        reason = failure_reason(error)
        trial_file.write({**record, "status": "failed", "reason": reason,
                          "wall_seconds": attempt_start + time.time() - started})  # fmt: skip
        raise TrialFailed(reason) from None
    trial_file.write({**record, "status": "finished", "wall_seconds": attempt_start + time.time() - started})


# -- driver side --------------------------------------------------------------------------------


class TokenASHA(ASHAScheduler):
    """ASHA on trained tokens that also records which trials it stopped (``pruned.jsonl``)."""

    def __init__(self, pruned_file: str, **kwargs):
        super().__init__(**kwargs)
        self.pruned_file = pruned_file
        self.pruned: set[str] = set()

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and trial.trial_id not in self.pruned:
            self.pruned.add(trial.trial_id)
            with open(self.pruned_file, "a", encoding="utf-8") as handle:
                entry = {"trial_id": trial.trial_id, TIME_ATTR: result.get(TIME_ATTR), "objective": result["objective"]}
                handle.write(json.dumps(entry) + "\n")
        return decision


class SweepProgress(tune.Callback):
    """One line on the driver whenever a trial ends: done / running / pruned / failed, best so far."""

    def __init__(self, objective: Objective, num_samples: int, scheduler: TokenASHA):
        self.objective, self.num_samples, self.scheduler = objective, num_samples, scheduler
        self.best: tuple[float, str] | None = None
        self.ended: set[str] = set()  # Tune updates a trial's status after its callbacks
        self.failed: set[str] = set()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get("objective")
        if value is not None and (self.best is None or self._better(value, self.best[0])):
            self.best = (value, trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)
        self._print(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)
        self.failed.add(trial.trial_id)
        self._print(trials)

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.objective.mode == "min" else a > b

    def _print(self, trials) -> None:
        ended = self.ended | {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        running = sum(t.status == "RUNNING" and t.trial_id not in ended for t in trials)
        failed = len(self.failed | {t.trial_id for t in trials if t.status == "ERROR"})
        pruned = len(self.scheduler.pruned)
        best = f"best {self.objective.spec} {self.best[0]:.4g} (trial {self.best[1]})" if self.best else "no result yet"
        print(
            f"[sweep] {len(ended)}/{self.num_samples} trials done ({pruned} pruned, {failed} failed), "
            f"{running} running; {best}",
            flush=True,
        )


def trial_concurrency(config: TrainConfig) -> int:
    """How many trials fit the cluster at once: its CPUs (and GPUs) over each trial's workers'."""
    resources = ray.cluster_resources()
    workers = config.distributed.num_workers
    fits = [resources.get("CPU", 0.0) // (workers * config.distributed.cpus_per_worker)]
    if config.distributed.use_gpu:
        fits.append(resources.get("GPU", 0.0) // (workers * config.distributed.gpus_per_worker))
    return max(1, int(min(fits)))


def optuna_storage(spec: str | None, study_name: str, resume: bool):
    """A persistent Optuna study (``sqlite:///path.db`` or a journal ``path.log``) that Optuna's tools open."""
    if not spec:
        return None
    import optuna

    if spec.startswith(("sqlite:", "postgresql:", "mysql:")):
        storage = optuna.storages.RDBStorage(spec)
    else:
        from optuna.storages.journal import JournalFileBackend

        storage = optuna.storages.JournalStorage(JournalFileBackend(spec))
    if not resume and any(s.study_name == study_name for s in storage.get_all_studies()):
        raise ConfigError(f"optuna storage: {spec} already holds a study named {study_name!r}; choose another --name")
    return storage


@dataclass
class SweepSettings:
    """The driver's choices, saved in ``SWEEP/sweep.json`` so a restore and the report reuse them."""

    name: str
    storage_path: str
    space_file: str
    cli_overrides: dict[str, Any]
    objective: str
    num_samples: int
    seed: int = 0
    max_concurrent: int | None = None
    optuna_storage: str | None = None

    @property
    def sweep_dir(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"


def build_tuner(settings: SweepSettings, plan: SweepPlan, resume: bool = False) -> tune.Tuner:
    """The ``Tuner`` of a new sweep, or the restored one of an interrupted sweep."""
    objective = plan.objective
    baseline_config = plan.trial_config(plan.space.baseline(), "unused")
    concurrency = settings.max_concurrent or trial_concurrency(baseline_config)
    budget = plan.space.budget
    grace = budget.grace_tokens or budget.eval_every_tokens or 1.0
    scheduler = TokenASHA(
        f"{plan.sweep_dir}/pruned.jsonl",
        time_attr=TIME_ATTR,
        metric="objective",
        mode=objective.mode,
        max_t=NO_TOKEN_LIMIT,
        grace_period=grace,
        reduction_factor=budget.reduction_factor,
    )
    searcher = OptunaSearch(
        space=plan.space,
        metric="objective",
        mode=objective.mode,
        points_to_evaluate=[plan.space.baseline(), *plan.space.points],
        seed=settings.seed,
        study_name=settings.name,
        storage=optuna_storage(settings.optuna_storage, settings.name, resume),
    )
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"CPU": 0.01})
    progress = SweepProgress(objective, settings.num_samples, scheduler)
    print(f"[sweep] {settings.num_samples} trials, up to {concurrency} at once; objective {objective.spec} "
          f"({objective.mode}); results in {plan.sweep_dir}", flush=True)  # fmt: skip
    if resume:
        return tune.Tuner.restore(
            plan.sweep_dir, trainable, resume_unfinished=True, resume_errored=True, param_space={}
        )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrency),
            scheduler=scheduler,
            num_samples=settings.num_samples,
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=settings.name,
            storage_path=settings.storage_path,
            callbacks=[progress],
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )


def save_settings(settings: SweepSettings) -> None:
    directory = Path(settings.sweep_dir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sweep.json").write_text(json.dumps(asdict(settings), indent=1))


def load_settings(sweep_dir: str) -> SweepSettings:
    path = Path(sweep_dir) / "sweep.json"
    if not path.exists():
        raise ConfigError(f"{sweep_dir}: not a sweep directory (no sweep.json)")
    return SweepSettings(**json.loads(path.read_text()))
