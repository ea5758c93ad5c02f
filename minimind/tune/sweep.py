"""A Ray Tune sweep: every Ray Tune touchpoint of the project is here.

Driver side, :func:`build_tuner` assembles a ``Tuner``:

- the trainable is a Tune *function*, :func:`run_trial`, that launches one Ray Train
  ``TorchTrainer`` per trial (Train V2 runs are not Tune trainables). Its run directory is
  ``SWEEP/trials/<trial id>``, so a restored trial resumes its own run from its last checkpoint;
- ``OptunaSearch`` (TPE, seeded) samples the search space define-by-run, the recipe's own values
  enqueued first as the baseline trial, no config twice (:class:`DistinctOptunaSearch`);
  ``ConcurrencyLimiter`` runs as many trials at once as the cluster has CPUs/GPUs for their workers;
- ``ASHAScheduler`` stops the worst trials at rungs measured in trained *tokens* (not Tune's
  ``training_iteration``, which restarts when a sweep is restored), so trials with different
  batches are compared at equal amounts of data.

A pipeline trial (a space with ``then`` stages) runs its stages one after another, each a Train run
in its own directory starting from the previous one's weights; only the last stage reports to Tune.
:func:`restore_tuner` finishes an interrupted sweep (``Tuner.restore``; see :class:`TokenASHA` and
:func:`already_ended` for what Tune itself does not restore).

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
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils import flatten_dict

from minimind import storage
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
        baseline = self.stage_configs(self.space.baseline(), "unused")[-1]
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


# CUDA's OutOfMemoryError, Python's MemoryError, and PyTorch's CPU allocator refusing an allocation.
OUT_OF_MEMORY = r"OutOfMemoryError|out of memory|MemoryError|can't allocate memory"


def failure_reason(error: BaseException) -> str:
    """One line saying why a trial's Train run failed: NaN/inf loss, out of memory, or the last error line."""
    text = str(error)
    found = re.search(r"NonFiniteLoss: (.+)", text)
    if found:
        return found.group(1).split(" (the last saved")[0].split("; stopping")[0].strip()
    if re.search(OUT_OF_MEMORY, text):
        line = next(ln for ln in text.splitlines() if re.search(OUT_OF_MEMORY, ln))
        return f"out of memory: {line.strip()[:300]}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


class TrialFile:
    """``trials/<id>/trial.json``: the trial's parameters, and how and when it ended."""

    def __init__(self, run_dir: str):
        self.path = storage.join(run_dir, "trial.json")

    def read(self) -> dict:
        return json.loads(storage.read_text(self.path)) if storage.is_file(self.path) else {}

    def write(self, record: dict) -> None:
        storage.write_text(self.path, json.dumps(record, indent=1))


def read_rows(path: str) -> list[dict]:
    """The rows of a jsonl file; a last line cut short by a killed process is left out."""
    if not storage.is_file(path):
        return []
    rows = []
    for line in storage.read_text(path).splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def evaluations(run_dir: str, objective: Objective) -> list[dict]:
    """A trial's evaluation rows, each with its ``objective``: what it reported to Tune."""
    rows = [(row, objective(row)) for row in read_rows(storage.join(run_dir, "metrics.jsonl"))]
    return [{**row, "objective": value} for row, value in rows if value is not None and TIME_ATTR in row]


def trial_ids(sweep_dir: str) -> list[str]:
    """The trials that have a run directory in the sweep (sorted)."""
    return storage.list_dir(storage.join(sweep_dir, "trials"))


def pruned_trials(sweep_dir: str) -> dict[str, dict]:
    return {row["trial_id"]: row for row in read_rows(storage.join(sweep_dir, PRUNED_FILE))}


def already_ended(record: dict, trial_id: str, plan: SweepPlan) -> bool:
    """A restored trial that had ended before the sweep was interrupted: it is not trained again.

    Finished and ASHA-stopped trials report their last evaluation again (Tune's record of them
    may predate their end); a trial whose loss turned NaN/inf fails again with its reason (it
    would again: training is deterministic). Others (out of memory, a crash) are retried from
    their last checkpoint.
    """
    if record.get("status") == "failed" and "NaN/inf" in (record.get("reason") or ""):
        raise TrialFailed(record["reason"])
    if record.get("status") != "finished" and trial_id not in pruned_trials(plan.sweep_dir):
        return False
    rows = evaluations(plan.judged_dir(trial_id), plan.objective)
    if rows:
        tune.report({**rows[-1], "total_steps": rows[-1]["step"]})  # its last: not judged at a rung again
    return True


def run_trial(params: dict, plan: SweepPlan) -> None:
    """Tune's function trainable: one Ray Train run of the trial's config (per stage), to its end."""
    params = flatten_dict(params, delimiter="/")  # Tune nests a later stage's "sft/optim.lr" as {"sft": {...}}
    trial_id = tune.get_context().get_trial_id()
    run_dir = plan.trial_dir(trial_id)
    started = time.time()
    trial_file = TrialFile(run_dir)
    record = trial_file.read()  # a restored trial keeps its first attempt's record
    if already_ended(record, trial_id, plan):
        return
    if record.get("status") == "running":  # cut short by an interrupted sweep: count that attempt's time
        record["wall_seconds"] = wall_seconds_so_far(record, plan.stage_dirs(trial_id))
    record.setdefault("started_at", started)
    record["attempt_started_at"] = started
    record.update(
        trial_id=trial_id, params=params, baseline=params == plan.space.baseline(), status="running", reason=None
    )
    attempt_start = record.get("wall_seconds", 0.0)
    trial_file.write(record)
    try:
        configs = plan.stage_configs(params, run_dir)
        for config in configs:  # a pipeline's earlier stages report nothing to Tune: the last one judges
            callbacks = [ObjectiveReport(plan.objective)] if config is configs[-1] else []
            build_trainer(paths_for_workers(config), callbacks=callbacks).fit()
    except Exception as error:  # the trial fails; the sweep goes on
        if trial_id in pruned_trials(plan.sweep_dir):
            # ASHA stopped it: Tune removes the run's resources, which ends fit() with an error.
            trial_file.write({**record, "status": "pruned", "wall_seconds": attempt_start + time.time() - started})
            return
        reason = failure_reason(error)
        trial_file.write({**record, "status": "failed", "reason": reason,
                          "wall_seconds": attempt_start + time.time() - started})  # fmt: skip
        raise TrialFailed(reason) from None
    trial_file.write({**record, "status": "finished", "wall_seconds": attempt_start + time.time() - started})


def wall_seconds_so_far(record: dict, stage_dirs: list[str]) -> float:
    """Time a trial has trained: recorded at its end; for one cut short, up to its last metrics line."""
    if record.get("status") in ("finished", "failed"):
        return float(record.get("wall_seconds", 0.0))
    started = record.get("attempt_started_at", record.get("started_at", 0.0))
    written = [storage.modified_time(storage.join(directory, "metrics.jsonl")) for directory in stage_dirs]
    last = max((mtime for mtime in written if mtime is not None), default=started)
    return float(record.get("wall_seconds", 0.0)) + max(0.0, last - started)


# -- driver side --------------------------------------------------------------------------------

PRUNED_FILE = "pruned.jsonl"


class TokenASHA(ASHAScheduler):
    """ASHA on trained tokens that records the trials it stopped (``pruned.jsonl``) and, in a
    restored sweep, rebuilds its rungs from the evaluations the trials wrote.

    ``Tuner.restore`` brings back the scheduler as it was when the sweep started (no rungs). Before
    the first trial is added, every recorded trial's evaluations are replayed in order into the
    rungs, exactly as they were first reported (a trial is recorded at a rung by its first result
    at or past it), and the stopped trials are read back, so no trial is judged against emptier
    rungs than before the interruption and a stopped trial stays stopped.
    """

    def __init__(self, plan: SweepPlan, early_stopping: bool = True, **kwargs):
        super().__init__(brackets=1, **kwargs)
        self.plan = plan
        self.early_stopping = early_stopping  # False: rungs are kept (and reported) but no trial is stopped
        self.pruned: set[str] = set()
        self.best_recorded: tuple[float, str] | None = None
        self._replayed = False

    def replay(self) -> None:
        self._replayed = True
        self.pruned = set(pruned_trials(self.plan.sweep_dir))
        [bracket] = self._brackets
        better = min if self.plan.objective.mode == "min" else max
        for trial_id in trial_ids(self.plan.sweep_dir):
            trial = _RecordedTrial(trial_id)
            for row in evaluations(self.plan.judged_dir(trial_id), self.plan.objective):
                bracket.on_result(trial, row[TIME_ATTR], self._metric_op * row["objective"])
                candidate = (row["objective"], trial_id)
                self.best_recorded = better(self.best_recorded or candidate, candidate, key=lambda pair: pair[0])

    def fell_below_a_rung(self, trial_id: str) -> bool:
        """Whether a trial that passed a rung is no longer among that rung's best ``1 / reduction_factor``.

        Asynchronous ASHA lets a trial past a rung when it beats the results recorded there *so far*,
        and never takes that back: the first trials pass on little or no evidence, and with a searcher
        that improves as it learns (TPE), each rung's later results are the better ones. Every result
        of a trial re-checks the rungs it passed against all results recorded there now, so an early
        promotion that later evidence does not support stops at its next evaluation instead of
        training to the end.
        """
        [bracket] = self._brackets
        for _, recorded in bracket._rungs:
            if trial_id in recorded and recorded[trial_id] < bracket.cutoff(recorded):
                return True
        return False

    def on_trial_add(self, tune_controller, trial):
        if not self._replayed:
            self.replay()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        if trial.trial_id in self.pruned:
            return TrialScheduler.STOP
        if "total_steps" in result and result["step"] >= result["total_steps"]:
            # The run's last evaluation: the trial ends on its own, finished, whatever the rung says.
            super().on_trial_result(tune_controller, trial, result)
            return TrialScheduler.CONTINUE
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.CONTINUE and self.fell_below_a_rung(trial.trial_id):
            decision = TrialScheduler.STOP
        if decision == TrialScheduler.STOP and not self.early_stopping:
            return TrialScheduler.CONTINUE
        if decision == TrialScheduler.STOP:
            self.pruned.add(trial.trial_id)
            entry = {"trial_id": trial.trial_id, TIME_ATTR: result.get(TIME_ATTR), "objective": result["objective"]}
            storage.append_line(storage.join(self.plan.sweep_dir, PRUNED_FILE), json.dumps(entry))
        return decision


@dataclass
class _RecordedTrial:
    """What ASHA's rungs know of a trial: its id."""

    trial_id: str


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
        # A restored sweep starts from the best of the results recorded before the interruption.
        known = [pair for pair in (self.best, self.scheduler.best_recorded) if pair is not None]
        pick = min if self.objective.mode == "min" else max
        found = pick(known, key=lambda pair: pair[0]) if known else None
        best = f"best {self.objective.spec} {found[0]:.4g} (trial {found[1]})" if found else "no result yet"
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


def optuna_storage(spec: str | None, study_name: str, resume: bool = False):
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
    sampler: str = "tpe"
    """``tpe`` (Optuna's TPE), ``random``, or ``grid`` (every combination of the space's values)."""
    early_stopping: bool = True
    """ASHA stops the worst trials at its rungs; False: every trial trains its whole budget."""
    max_concurrent: int | None = None
    optuna_storage: str | None = None

    @property
    def sweep_dir(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"


def build_tuner(settings: SweepSettings, plan: SweepPlan) -> tune.Tuner:
    """The ``Tuner`` of a new sweep."""
    objective = plan.objective
    baseline_config = plan.trial_config(plan.space.baseline(), "unused")
    concurrency = settings.max_concurrent or trial_concurrency(baseline_config)
    budget = plan.space.budget
    scheduler = TokenASHA(
        plan,
        early_stopping=settings.early_stopping,
        time_attr=TIME_ATTR,
        metric="objective",
        mode=objective.mode,
        max_t=NO_TOKEN_LIMIT,
        grace_period=budget.grace_tokens or budget.eval_every_tokens or 1.0,
        reduction_factor=budget.reduction_factor,
    )
    searcher = DistinctOptunaSearch(
        space=plan.space,
        metric="objective",
        mode=objective.mode,
        # A grid holds the baseline already (when the recipe's values are among the space's).
        points_to_evaluate=None if settings.sampler == "grid" else [plan.space.baseline(), *plan.space.points],
        sampler=optuna_sampler(settings, plan),
        study_name=settings.name,
        storage=optuna_storage(settings.optuna_storage, settings.name),
    )
    print(f"[sweep] {settings.num_samples} trials, up to {concurrency} at once; objective {objective.spec} "
          f"({objective.mode}); results in {plan.sweep_dir}", flush=True)  # fmt: skip
    save_state_often()
    return tune.Tuner(
        trainable(plan),
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrency),
            scheduler=scheduler,
            num_samples=settings.num_samples,
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=settings.name,
            storage_path=settings.storage_path,
            callbacks=[SweepProgress(objective, settings.num_samples, scheduler)],
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )


SAMPLERS = ("tpe", "random", "grid")


def optuna_sampler(settings: SweepSettings, plan: SweepPlan):
    import optuna

    if settings.sampler == "grid":
        return optuna.samplers.GridSampler(plan.space.grid(), seed=settings.seed)
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=settings.seed)
    # constant_liar: a running trial counts as a poor result, so concurrent trials spread out.
    return optuna.samplers.TPESampler(seed=settings.seed, constant_liar=True)


class DistinctOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that does not run a config twice.

    TPE and random sampling over a space of choices draw the same point again and again (12 TPE
    trials over a 12-point space drew one config three times), and a repeat trains the same model
    on the same data again. A drawn config already run (or running) is told to Optuna as a repeat,
    with its twin's result (or as pruned while the twin runs), and another is drawn; only a space
    with no untried point left after ``MAX_REDRAWS`` draws runs a repeat.
    """

    MAX_REDRAWS = 32

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._trial_of_config: dict[str, str] = {}  # saved and restored with the searcher's __dict__
        self._result_of_trial: dict[str, float] = {}

    def suggest(self, trial_id: str) -> dict | None:
        from optuna.trial import TrialState

        for _ in range(self.MAX_REDRAWS):
            config = super().suggest(trial_id)
            key = json.dumps(config, sort_keys=True, default=str)
            twin = self._trial_of_config.get(key)
            if twin is None:
                break
            repeat = self._ot_trials.pop(trial_id)
            repeat.set_user_attr("repeat_of", twin)
            value = self._result_of_trial.get(twin)
            self._ot_study.tell(repeat, value, state=TrialState.PRUNED if value is None else TrialState.COMPLETE)
        self._trial_of_config[key] = trial_id
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result and result.get(self.metric) is not None and math.isfinite(result[self.metric]):
            self._result_of_trial[trial_id] = result[self.metric]
        super().on_trial_complete(trial_id, result, error)


def trainable(plan: SweepPlan):
    return tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"CPU": 0.01})


def save_state_often() -> None:
    """Tune saves the sweep's state (trials, searcher) every 10 s by default: a trial started or
    ended in the seconds before the driver dies would be unknown to the restored sweep. Every
    second is cheap at a sweep's scale (a small JSON file and the pickled study)."""
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")


def restore_tuner(settings: SweepSettings, plan: SweepPlan) -> tune.Tuner:
    """The interrupted sweep in ``plan.sweep_dir``, restored by ``Tuner.restore``.

    Tune restores the trials, the searcher (Optuna's study, how many trials were created) and the
    scheduler and callbacks as they were created. Unfinished trials (and errored ones, see
    :func:`already_ended`) run again: each continues its own Train run from its last checkpoint,
    and one that had in fact ended just reports its result. ASHA's rungs are rebuilt by
    :class:`TokenASHA` from the trials' own records.
    """
    if not tune.Tuner.can_restore(plan.sweep_dir):
        raise ConfigError(f"--resume: {plan.sweep_dir} holds no Tune state to restore (the sweep never started?)")
    lost = set_aside_lost_trials(plan.sweep_dir)
    if lost:
        print(f"[sweep] {len(lost)} trial(s) started after the sweep's last saved state; their runs are in "
              f"{plan.sweep_dir}/lost and new trials take their places: {', '.join(lost)}", flush=True)  # fmt: skip
    print(f"[sweep] resuming {plan.sweep_dir}", flush=True)
    save_state_often()
    return tune.Tuner.restore(plan.sweep_dir, trainable(plan), resume_unfinished=True, resume_errored=True)


def set_aside_lost_trials(sweep_dir: str) -> list[str]:
    """Move the runs of trials the restored sweep does not know into ``SWEEP/lost``."""
    from ray.tune import ExperimentAnalysis

    known = {trial.trial_id for trial in ExperimentAnalysis(sweep_dir).trials}
    lost = [trial_id for trial_id in trial_ids(sweep_dir) if trial_id not in known]
    for trial_id in lost:
        storage.move_dir(storage.join(sweep_dir, "trials", trial_id), storage.join(sweep_dir, "lost", trial_id))
    return lost


def close_lost_optuna_trials(settings: SweepSettings) -> None:
    """After a restored sweep, mark the persistent study's trials that no Tune trial will finish
    (asked for after the last saved state) as failed, so Optuna's tools do not show them running."""
    storage = optuna_storage(settings.optuna_storage, settings.name, resume=True)
    if storage is None:
        return
    import optuna

    study = optuna.load_study(study_name=settings.name, storage=storage)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


SETTINGS_FILE = "sweep.json"


def save_settings(settings: SweepSettings) -> None:
    storage.write_text(storage.join(settings.sweep_dir, SETTINGS_FILE), json.dumps(asdict(settings), indent=1))


def load_settings(sweep_dir: str) -> SweepSettings:
    path = storage.join(sweep_dir, SETTINGS_FILE)
    if not storage.is_file(path):
        raise ConfigError(f"{sweep_dir}: not a sweep directory (no {SETTINGS_FILE})")
    return SweepSettings(**json.loads(storage.read_text(path)))
