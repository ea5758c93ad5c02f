"""The search: Optuna's samplers (TPE, random, grid) behind Ray's ``OptunaSearch``, no config run
twice (:class:`DistinctOptunaSearch`), and the persistent Optuna study a sweep may keep."""

from __future__ import annotations

import json
import math
import warnings

from ray.tune.search.optuna import OptunaSearch

from minimind.config import ConfigError
from minimind.tune.plan import SweepPlan
from minimind.tune.settings import SweepSettings, default_startup_trials


def optuna_sampler(settings: SweepSettings, plan: SweepPlan):
    import optuna

    if settings.sampler == "grid":
        return optuna.samplers.GridSampler(plan.space.grid(), seed=settings.seed)
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=settings.seed)
    # constant_liar: a running trial counts as a poor result, so concurrent trials spread out.
    # multivariate + group: one joint density over parameters that depend on each other (lr with batch),
    # per set of parameters sampled together (a conditional space's branches). A trial ASHA stopped
    # reaches Optuna as complete with its last value: Ray's OptunaSearch tells it the last result of a trial
    # stopped while running, and SweepLimiter the rung's result of one stopped while paused there.
    startup = settings.startup_trials or default_startup_trials(settings.num_samples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=settings.seed, constant_liar=True, n_startup_trials=startup, multivariate=True, group=True
        )


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
