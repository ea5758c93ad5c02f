"""A Ray Tune sweep: every Ray Tune touchpoint of the project is here.

Driver side, :func:`build_tuner` assembles a ``Tuner``:

- the trainable is a Tune *function*, :func:`run_trial`, that launches one Ray Train
  ``TorchTrainer`` per trial (Train V2 runs are not Tune trainables). Its run directory is
  ``SWEEP/trials/<trial id>``, so a restored trial resumes its own run from its last checkpoint;
- ``OptunaSearch`` (TPE, seeded) samples the search space define-by-run, the recipe's own values
  enqueued first as the baseline trial, no config twice (:class:`DistinctOptunaSearch`);
  a concurrency limiter runs as many trials at once as the cluster has CPUs/GPUs for their workers;
- :class:`TokenASHA` stops the worst trials at rungs measured in trained *tokens* (not Tune's
  ``training_iteration``, which restarts when a sweep is restored), so trials with different
  batches are compared at equal amounts of data; a trial without the evidence to go past a rung
  waits there, paused, its slot (:class:`SweepLimiter`) free for another trial.

A pipeline trial (a space with ``then`` stages) runs its stages one after another, each a Train run
in its own directory starting from the previous one's weights; only the last stage reports to Tune.
:func:`restore_tuner` finishes an interrupted sweep (``Tuner.restore``; see :class:`TokenASHA` and
:func:`already_ended` for what Tune itself does not restore).

Trial side, :class:`ObjectiveReport` (a Ray Train callback) forwards each evaluation of rank 0 to
Tune with the sweep's ``objective`` added, and holds the run at each one until Tune has judged it.
Each trial records what it ran and how it ended in ``trials/<id>/trial.json`` next to the run's
``metrics.jsonl``; the report is built from those files, so it can be written for an interrupted
sweep too.
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
import ray.util.queue
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
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
NO_TOKEN_LIMIT = 1e18  # rungs of trials that train by epochs (no budget.max_tokens)


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
    """Forwards rank 0's evaluations to Tune with the sweep's objective (others are not results), and
    answers every report on ``verdicts`` (see :func:`minimind.train.distributed.build_trainer`): at
    once for a report Tune does not judge, after Tune's CONTINUE for one it does.
    """

    def __init__(self, objective: Objective):
        super().__init__()
        self.objective = objective
        self.verdicts = ray.util.queue.Queue(actor_options={"num_cpus": 0})

    def after_report(self, run_context, metrics, checkpoint):
        value = self.objective(metrics[0])
        if value is not None:
            super().after_report(run_context, [{**metrics[0], "objective": value}], checkpoint)
            # Tune takes the next item from this one-slot queue only after a CONTINUE, so an empty
            # item (which reports nothing) queued behind the result is taken exactly then; after a
            # PAUSE or STOP it never is, and the run ends with the trial.
            results = self._training_actor_item_queue
            results.put({})
            while not results.empty():
                time.sleep(0.02)
        self.verdicts.put("go on")


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


def asha_decisions(sweep_dir: str) -> list[dict]:
    """What :class:`TokenASHA` decided, in order (``SWEEP/asha.jsonl``)."""
    return read_rows(storage.join(sweep_dir, DECISIONS_FILE))


def pruned_trials(sweep_dir: str) -> dict[str, dict]:
    """The trials ASHA stopped, each with the tokens and objective it was stopped at."""
    return {row["trial_id"]: row for row in asha_decisions(sweep_dir) if row["decision"] == "stop"}


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
            if config is configs[-1]:
                report = ObjectiveReport(plan.objective)
                build_trainer(paths_for_workers(config), callbacks=[report], verdicts=report.verdicts).fit()
            else:
                build_trainer(paths_for_workers(config)).fit()
    except Exception as error:  # the trial fails; the sweep goes on
        # ASHA paused it at a rung (it resumes from its checkpoint later) or stopped it: Tune removes
        # the run's resources, which ends fit() with an error. TokenASHA recorded why in trial.json.
        decisions = [row for row in asha_decisions(plan.sweep_dir) if row["trial_id"] == trial_id]
        last = decisions[-1] if decisions else {}
        if last.get("decision") == "stop" or (last.get("decision") == "pause" and last["at"] >= started):
            return
        reason = failure_reason(error)
        trial_file.write({**record, "status": "failed", "reason": reason,
                          "wall_seconds": attempt_start + time.time() - started})  # fmt: skip
        raise TrialFailed(reason) from None
    trial_file.write({**record, "status": "finished", "wall_seconds": attempt_start + time.time() - started})


def wall_seconds_so_far(record: dict, stage_dirs: list[str]) -> float:
    """Time a trial has trained: recorded when it ended or waits at a rung; for one running or cut
    short, up to its last metrics line."""
    if record.get("status") in ("finished", "failed", "pruned", "waiting"):
        return float(record.get("wall_seconds", 0.0))
    started = record.get("attempt_started_at", record.get("started_at", 0.0))
    written = [storage.modified_time(storage.join(directory, "metrics.jsonl")) for directory in stage_dirs]
    last = max((mtime for mtime in written if mtime is not None), default=started)
    return float(record.get("wall_seconds", 0.0)) + max(0.0, last - started)


# -- driver side --------------------------------------------------------------------------------

DECISIONS_FILE = "asha.jsonl"


class TokenASHA(FIFOScheduler):
    """ASHA (Li et al., 2020) on trained tokens, promoting a trial only on evidence.

    Rungs sit at ``grace_tokens * reduction_factor**k`` tokens, below ``budget.max_tokens``. A trial's
    first evaluation at or past a rung is recorded there, and it goes on only while it ranks among
    the rung's best ``floor(n / reduction_factor)`` of the ``n`` results recorded there. A trial that
    does not (yet) waits there, paused (its workers freed for other trials), until enough results
    have come in to rank it among the best, or until no other trial can still reach the rung: then
    the best ``max(1, floor(n / reduction_factor))`` go on and the others stop. A waiting trial resumes
    its own Train run from the checkpoint it wrote at the rung.

    Ray's ``ASHAScheduler`` instead passes a trial that beats the rung's cutoff *so far*: the first
    trial at a rung always passes, and in a small sweep most early trials train to the end (12
    trials over 3 seeds: 22-56% of a grid's tokens, against 17-26% here; ``docs/benchmarks.md``).
    A promotion is also re-checked at each later evaluation: a trial no longer among the best of a
    rung it passed, once that rung holds more results, waits there again (and stops with the others
    once the rung is complete); a suspended promotion keeps its place should more results rank it
    back among the best, which a stop would throw away.

    Every decision is appended to ``SWEEP/asha.jsonl`` (stop, pause, promote), and a paused or
    stopped trial's ``trial.json`` says ``waiting`` or ``pruned``. ``Tuner.restore``
    brings the scheduler back as it was created; before the first trial is added, every recorded
    trial's evaluations are replayed into the rungs in order and the decisions are read back, so no
    trial is judged against emptier rungs than before the interruption and a stopped trial stays
    stopped. (A trial waiting when the sweep was interrupted trains to its next evaluation before
    waiting again.)
    """

    def __init__(self, plan: SweepPlan, early_stopping: bool = True):
        super().__init__()
        budget = plan.space.budget
        self.plan = plan
        self.early_stopping = early_stopping  # False: rungs are kept (and reported) but no trial waits or stops
        self.reduction_factor = budget.reduction_factor
        grace = budget.grace_tokens or budget.eval_every_tokens or 1.0
        limit = budget.max_tokens or NO_TOKEN_LIMIT
        self.milestones = [m for m in (grace * self.reduction_factor**k for k in range(64)) if m < limit]
        self.rungs: list[dict[str, float]] = [{} for _ in self.milestones]  # trial id -> objective, in arrival order
        self.passed: dict[str, int] = {}  # trial id -> how many rungs it was promoted past
        self.waiting: dict[str, int] = {}  # trial id -> the rung it waits at (paused)
        self.pruned: set[str] = set()
        self.best_recorded: tuple[float, str] | None = None
        self._replayed = False

    # -- the rule -----------------------------------------------------------------------------

    def record(self, trial_id: str, tokens: float, value: float) -> None:
        """Record a result at the highest rung it reaches that the trial has no result at yet."""
        for index in reversed(range(len(self.milestones))):
            if tokens >= self.milestones[index]:
                if trial_id not in self.rungs[index]:
                    self.rungs[index][trial_id] = value
                return

    def ranked(self, index: int) -> list[str]:
        sign = 1.0 if self.plan.objective.mode == "min" else -1.0
        results = self.rungs[index]
        return sorted(results, key=lambda trial_id: sign * results[trial_id])  # stable: ties by arrival

    def quota(self, index: int, complete: bool) -> int:
        """How many of a rung's results may go on: a ``1 / reduction_factor`` share, at least one once
        no other trial can reach the rung."""
        share = int(len(self.rungs[index]) // self.reduction_factor)
        return max(1, share) if complete else share

    def among_best(self, trial_id: str, index: int, complete: bool) -> bool:
        return trial_id in self.ranked(index)[: self.quota(index, complete)]

    def open_rung(self, trial_id: str) -> int | None:
        """The highest rung the trial has a result at but was not promoted past."""
        recorded = [index for index, results in enumerate(self.rungs) if trial_id in results]
        return recorded[-1] if recorded and recorded[-1] >= self.passed.get(trial_id, 0) else None

    def rung_fallen_below(self, trial_id: str, complete: list[bool]) -> int | None:
        """The lowest rung the trial was promoted past that now ranks it below its best share, if any."""
        for index in range(self.passed.get(trial_id, 0)):
            if trial_id in self.rungs[index] and not self.among_best(trial_id, index, complete[index]):
                return index
        return None

    def complete_rungs(self, tune_controller) -> list[bool]:
        """Per rung, whether no trial can still reach it: the searcher made its last trial and every
        live trial has a result there or beyond (or waits, to be stopped, at a lower one)."""
        if not tune_controller.search_alg.is_finished():
            return [False] * len(self.milestones)
        live = [t.trial_id for t in tune_controller.get_trials() if t.status not in ("TERMINATED", "ERROR")]
        live = [trial_id for trial_id in live if trial_id not in self.pruned]
        complete = []
        for index in range(len(self.milestones)):
            later = self.rungs[index:]
            can_arrive = [trial_id for trial_id in live if not any(trial_id in results for results in later)]
            # A trial waiting at a lower complete rung and not among its best will be stopped there.
            can_arrive = [
                trial_id for trial_id in can_arrive
                if not (trial_id in self.waiting and complete[self.waiting[trial_id]]
                        and not self.among_best(trial_id, self.waiting[trial_id], True))
            ]  # fmt: skip
            complete.append(not can_arrive)
        return complete

    # -- Tune's hooks -------------------------------------------------------------------------

    def on_trial_add(self, tune_controller, trial):
        if not self._replayed:
            self.replay()

    def on_trial_result(self, tune_controller, trial, result):
        trial_id = trial.trial_id
        if trial_id in self.pruned:
            return TrialScheduler.STOP
        if TIME_ATTR not in result or "objective" not in result:
            return TrialScheduler.CONTINUE
        self.record(trial_id, result[TIME_ATTR], result["objective"])
        if not self.early_stopping or ("total_steps" in result and result["step"] >= result["total_steps"]):
            # No early stopping, or the run's last evaluation: the trial ends on its own, finished.
            self.settle(tune_controller)
            return TrialScheduler.CONTINUE
        if trial_id in self.waiting:  # a result that was on its way when it was paused
            return TrialScheduler.PAUSE
        complete = self.complete_rungs(tune_controller)
        decision = TrialScheduler.CONTINUE
        if (index := self.rung_fallen_below(trial_id, complete)) is not None:
            if complete[index]:
                decision = self.stop(trial_id, result)
            else:  # suspended, not revoked: it waits at that rung again, and goes on if more results rank it back
                self.passed[trial_id] = index
                decision = self.pause(tune_controller, trial_id, index, result)
        elif (index := self.open_rung(trial_id)) is not None:
            if self.among_best(trial_id, index, complete[index]):
                self.promote(trial_id, index)
            elif complete[index]:
                decision = self.stop(trial_id, result)
            else:
                decision = self.pause(tune_controller, trial_id, index, result)
        self.settle(tune_controller)
        return decision

    def on_trial_complete(self, tune_controller, trial, result):
        self.settle(tune_controller)

    def on_trial_error(self, tune_controller, trial):
        self.settle(tune_controller)

    def on_trial_remove(self, tune_controller, trial):
        self.waiting.pop(trial.trial_id, None)
        self.settle(tune_controller)

    def choose_trial_to_run(self, tune_controller):
        """New trials first (the limiter admitted them), then a waiting trial now among its rung's
        best, highest rung first, while the limiter has a free slot for it."""
        trials = tune_controller.get_trials()
        for trial in trials:
            if trial.status == Trial.PENDING:
                return trial
        limiter: SweepLimiter = tune_controller.search_alg.searcher
        if not limiter.has_room():
            return None
        for trial_id in self.promotable(self.complete_rungs(tune_controller)):
            trial = next((t for t in trials if t.trial_id == trial_id and t.status == Trial.PAUSED), None)
            if trial is not None:
                self.promote(trial_id, self.waiting.pop(trial_id))
                limiter.unpause(trial_id)
                self.settle(tune_controller)  # one promotion fewer to keep a slot for
                return trial
        return None

    # -- decisions ----------------------------------------------------------------------------

    def promotable(self, complete: list[bool]) -> list[str]:
        """The waiting trials now among their rung's best, highest rung first, best first."""
        ready = [tid for tid, index in self.waiting.items() if self.among_best(tid, index, complete[index])]
        return sorted(ready, key=lambda tid: (-self.waiting[tid], self.ranked(self.waiting[tid]).index(tid)))

    def settle(self, tune_controller) -> None:
        """After any change: stop the waiting trials of complete rungs that are not among the best,
        and keep a limiter slot for each waiting trial that may now go on."""
        if tune_controller is None:
            return
        complete = self.complete_rungs(tune_controller)  # stopping the waiting trials below does not change it
        trials = {t.trial_id: t for t in tune_controller.get_trials()}
        for trial_id, index in list(self.waiting.items()):
            if trial_id in self.waiting and complete[index] and not self.among_best(trial_id, index, True):
                del self.waiting[trial_id]  # before stop_trial, whose on_trial_remove settles again
                self.stop(trial_id, {TIME_ATTR: self.milestones[index], "objective": self.rungs[index][trial_id]})
                tune_controller.stop_trial(trials[trial_id])
        tune_controller.search_alg.searcher.promotions_waiting = len(self.promotable(complete))

    def decide(self, decision: str, trial_id: str, **fields) -> None:
        entry = {"trial_id": trial_id, "decision": decision, **fields, "at": time.time()}
        storage.append_line(storage.join(self.plan.sweep_dir, DECISIONS_FILE), json.dumps(entry))

    def stop(self, trial_id: str, result: dict) -> str:
        self.pruned.add(trial_id)
        self.decide("stop", trial_id, **{TIME_ATTR: result.get(TIME_ATTR), "objective": result["objective"]})
        self.record_status(trial_id, "pruned")
        return TrialScheduler.STOP

    def promote(self, trial_id: str, index: int) -> None:
        self.passed[trial_id] = index + 1
        self.decide("promote", trial_id, rung=self.milestones[index])

    def pause(self, tune_controller, trial_id: str, index: int, result: dict) -> str:
        self.waiting[trial_id] = index
        tune_controller.search_alg.searcher.pause(trial_id)
        self.decide("pause", trial_id, rung=self.milestones[index], **{TIME_ATTR: result[TIME_ATTR]})
        self.record_status(trial_id, "waiting")
        return TrialScheduler.PAUSE

    def record_status(self, trial_id: str, status: str) -> None:
        """Mark the trial's record ``waiting`` (at a rung) or ``pruned``, with the time it trained so
        far: its run is being ended (holding at this evaluation), so it writes nothing more until
        it is resumed."""
        trial_file = TrialFile(self.plan.trial_dir(trial_id))
        record = trial_file.read()
        if record:
            seconds = wall_seconds_so_far(record, self.plan.stage_dirs(trial_id))
            trial_file.write({**record, "status": status, "wall_seconds": seconds})

    def replay(self) -> None:
        """Rebuild the rungs and decisions of a restored sweep from the trials' records."""
        self._replayed = True
        better = min if self.plan.objective.mode == "min" else max
        for trial_id in trial_ids(self.plan.sweep_dir):
            for row in evaluations(self.plan.judged_dir(trial_id), self.plan.objective):
                self.record(trial_id, row[TIME_ATTR], row["objective"])
                candidate = (row["objective"], trial_id)
                self.best_recorded = better(self.best_recorded or candidate, candidate, key=lambda pair: pair[0])
        for row in asha_decisions(self.plan.sweep_dir):
            if row["decision"] == "stop":
                self.pruned.add(row["trial_id"])
            elif row["decision"] == "promote":
                self.passed[row["trial_id"]] = self.milestones.index(row["rung"]) + 1
            elif row["decision"] == "pause" and row["trial_id"] in self.passed:  # a promotion suspended
                self.passed[row["trial_id"]] = min(self.passed[row["trial_id"]], self.milestones.index(row["rung"]))


class SweepLimiter(ConcurrencyLimiter):
    """Ray's ``ConcurrencyLimiter``, not counting trials paused at a rung (their workers are free) and
    keeping a slot for each waiting trial that may go on, so promotions go before new trials."""

    def __init__(self, searcher, max_concurrent: int):
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.paused: set[str] = set()
        self.promotions_waiting = 0

    def has_room(self) -> bool:
        return len(self.live_trials) < self.max_concurrent

    def suggest(self, trial_id: str):
        if len(self.live_trials) + self.promotions_waiting >= self.max_concurrent:
            return None
        return super().suggest(trial_id)

    def pause(self, trial_id: str) -> None:
        if trial_id in self.live_trials:
            self.live_trials.remove(trial_id)
            self.num_unfinished_live_trials -= 1
            self.paused.add(trial_id)

    def unpause(self, trial_id: str) -> None:
        if trial_id in self.paused:
            self.paused.remove(trial_id)
            self.live_trials.add(trial_id)
            self.num_unfinished_live_trials += 1

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.paused:  # stopped while waiting at a rung
            self.paused.remove(trial_id)
            self.searcher.on_trial_complete(trial_id, result=result, error=error)
            return
        super().on_trial_complete(trial_id, result=result, error=error)


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
        waiting = len(self.scheduler.waiting)
        failed = len(self.failed | {t.trial_id for t in trials if t.status == "ERROR"})
        pruned = len(self.scheduler.pruned)
        # A restored sweep starts from the best of the results recorded before the interruption.
        known = [pair for pair in (self.best, self.scheduler.best_recorded) if pair is not None]
        pick = min if self.objective.mode == "min" else max
        found = pick(known, key=lambda pair: pair[0]) if known else None
        best = f"best {self.objective.spec} {found[0]:.4g} (trial {found[1]})" if found else "no result yet"
        print(
            f"[sweep] {len(ended)}/{self.num_samples} trials done ({pruned} pruned, {failed} failed), "
            f"{running} running, {waiting} waiting at a rung; {best}",
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
    scheduler = TokenASHA(plan, early_stopping=settings.early_stopping)
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
            search_alg=SweepLimiter(searcher, max_concurrent=concurrency),
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
