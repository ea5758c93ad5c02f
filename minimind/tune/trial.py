"""A trial's life, inside the trial: Tune's function trainable :func:`run_trial` launches one Ray Train
``TorchTrainer`` per stage (Train V2 runs are not Tune trainables) in ``SWEEP/trials/<trial id>``, so a
restored trial resumes its own run from its last checkpoint. :class:`ObjectiveReport` (a Ray Train
callback) forwards each evaluation of rank 0 to Tune with the sweep's ``objective`` added, and holds the
run at each one until Tune has judged it. A pipeline trial (a space with ``then`` stages) runs its
stages one after another, each from the previous one's weights; only the last stage reports to Tune.
"""

from __future__ import annotations

import re
import time

import ray
import ray.util.queue
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.utils import flatten_dict

from minimind.train.distributed import build_trainer, paths_for_workers
from minimind.tune.plan import Objective, SweepPlan
from minimind.tune.records import TrialFile, asha_decisions, evaluations, pruned_trials, wall_seconds_so_far


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


def trainable(plan: SweepPlan):
    return tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"CPU": 0.01})
