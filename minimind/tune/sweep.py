"""A Ray Tune sweep, driver side: :func:`build_tuner` assembles a ``Tuner`` and :func:`restore_tuner`
brings back an interrupted one. Where each part lives:

- the trials' configs and the objective: ``plan.py``; a trial's life (its Train runs, what it
  reports to Tune): ``trial.py``; the files a sweep leaves: ``records.py``;
- the search (``OptunaSearch``, TPE seeded, the recipe's own values enqueued first as the baseline
  trial, no config twice): ``search.py``;
- early stopping (:class:`~minimind.tune.asha.TokenASHA` on trained tokens, a trial without the
  evidence to go past a rung waiting there, paused, its slot free for another): ``asha.py``;
- the driver's choices (``sweep.json``): ``settings.py``.

A concurrency limiter runs as many trials at once as the cluster can hold (``minimind/capacity.py``: what an autoscaling
cluster can scale to, not only the nodes up when the sweep starts).
:func:`restore_tuner` finishes an interrupted sweep (``Tuner.restore``; see ``TokenASHA`` and
:func:`~minimind.tune.trial.already_ended` for what Tune itself does not restore).
"""

from __future__ import annotations

import os

import ray
from ray import tune

from minimind import storage
from minimind.capacity import choose_concurrency, cluster_limits, on_kuberay
from minimind.config import ConfigError
from minimind.train.distributed import worker_resources
from minimind.tune.asha import SweepLimiter, TokenASHA
from minimind.tune.plan import Objective, SweepPlan
from minimind.tune.records import trial_ids
from minimind.tune.search import DistinctOptunaSearch, optuna_sampler, optuna_storage
from minimind.tune.settings import SweepSettings
from minimind.tune.trial import trainable


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


def sweep_concurrency(settings: SweepSettings, plan: SweepPlan) -> tuple[int, str]:
    """How many trials run at once, and how that was counted: ``--max-concurrent``, else what the cluster can
    scale to when its autoscaler's limits can be read, else what its nodes fit now (:mod:`~minimind.capacity`).
    A cluster that may autoscale beyond what can be read is refused with a ``ConfigError`` naming the flag."""
    if settings.max_concurrent:
        return settings.max_concurrent, "--max-concurrent"
    dist = plan.trial_config(plan.space.baseline(), "unused").distributed
    per_worker = worker_resources(dist)
    present = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    return choose_concurrency(
        present, cluster_limits(), per_worker, dist.num_workers, kuberay=on_kuberay(), placement=dist.placement_strategy
    )


def build_tuner(settings: SweepSettings, plan: SweepPlan, concurrency: tuple[int, str] | None = None) -> tune.Tuner:
    """The ``Tuner`` of a new sweep (``concurrency``: :func:`sweep_concurrency`'s answer, counted if not given)."""
    objective = plan.objective
    concurrency, counted = concurrency or sweep_concurrency(settings, plan)
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
    print(f"[sweep] {settings.num_samples} trials, up to {concurrency} at once ({counted}); objective "
          f"{objective.spec} ({objective.mode}); results in {plan.sweep_dir}", flush=True)  # fmt: skip
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
