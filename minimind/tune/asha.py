"""Early stopping: :class:`TokenASHA`, the rule that decides which trials wait, go on or stop at rungs
measured in trained tokens, and :class:`SweepLimiter`, the concurrency limit that frees a waiting
trial's slot and keeps slots for promotions."""

from __future__ import annotations

import json
import time

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter

from minimind import storage
from minimind.tune.plan import TIME_ATTR, SweepPlan, rung_milestones
from minimind.tune.records import (
    DECISIONS_FILE,
    TrialFile,
    asha_decisions,
    evaluations,
    rung_position,
    trial_ids,
    wall_seconds_so_far,
)


class TokenASHA(FIFOScheduler):
    """ASHA (Li et al., 2020) on trained tokens, promoting a trial only on evidence.

    Rungs sit at ``grace_tokens * reduction_factor**k`` tokens, below ``budget.max_tokens``, counted
    as the budget is (``budget_tokens``: the tokens a trial's steps hold), and every trial is evaluated
    at the step where it reaches each (``SweepPlan.trial_config``). A trial's
    first evaluation at or past a rung is recorded there, and it goes on only while it ranks among
    the rung's best ``floor(n / reduction_factor)`` of the ``n`` results recorded there. A trial that
    does not (yet) waits there, paused (its workers freed for other trials), until enough results
    have come in to rank it among the best, or until no other trial can still reach the rung: then
    the best ``max(1, floor(n / reduction_factor))`` go on and the others stop. A waiting trial resumes
    its own Train run from the checkpoint it wrote at the rung.

    Ray's ``ASHAScheduler`` instead passes a trial that beats the rung's cutoff *so far*: the first
    trial at a rung always passes, and in a small sweep most early trials train to the end (in an
    earlier 12-trial setting, 22-56% of a grid's tokens against 17-26% with this rule; in the current
    ablation ASHA + TPE trains 9.4-17.7% of the grid's tokens: ``docs/benchmarks.md``).
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
        self.milestones = rung_milestones(budget)
        self.rungs: list[dict[str, float]] = [{} for _ in self.milestones]  # trial id -> objective, in arrival order
        self.passed: dict[str, int] = {}  # trial id -> how many rungs it was promoted past
        self.waiting: dict[str, int] = {}  # trial id -> the rung it waits at (paused)
        self.pruned: set[str] = set()
        self.best_recorded: tuple[float, str] | None = None
        self._replayed = False

    # -- the rule -----------------------------------------------------------------------------

    def record(self, trial_id: str, position: float, value: float) -> None:
        """Record a result at the highest rung its position (:func:`rung_position`) reaches that the
        trial has no result at yet."""
        for index in reversed(range(len(self.milestones))):
            if position >= self.milestones[index]:
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

    def complete_rungs(self, tune_controller, ending: str | None = None) -> list[bool]:
        """Per rung, whether no trial can still reach it: the searcher made its last trial and every
        live trial has a result there or beyond (or waits, to be stopped, at a lower one).

        ``ending``: a trial whose end or error Tune is reporting. Tune tells the scheduler before it marks
        the trial ended, so it would still count as one that may reach the rung; were its error the
        sweep's last event, a trial waiting there would wait forever."""
        if not tune_controller.search_alg.is_finished():
            return [False] * len(self.milestones)
        live = [t.trial_id for t in tune_controller.get_trials() if t.status not in ("TERMINATED", "ERROR")]
        live = [trial_id for trial_id in live if trial_id not in self.pruned and trial_id != ending]
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
        self.record(trial_id, rung_position(result), result["objective"])
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
        self.settle(tune_controller, ending=trial.trial_id)

    def on_trial_error(self, tune_controller, trial):
        self.settle(tune_controller, ending=trial.trial_id)

    def on_trial_remove(self, tune_controller, trial):
        self.waiting.pop(trial.trial_id, None)
        self.settle(tune_controller, ending=trial.trial_id)

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

    def settle(self, tune_controller, ending: str | None = None) -> None:
        """After any change: stop the waiting trials of complete rungs that are not among the best,
        and keep a limiter slot for each waiting trial that may now go on (``ending``: see
        :meth:`complete_rungs`)."""
        if tune_controller is None:
            return
        complete = self.complete_rungs(tune_controller, ending)  # stopping the waiting trials below does not change it
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
        tune_controller.search_alg.searcher.pause(trial_id, {"objective": result["objective"]})
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
                self.record(trial_id, rung_position(row), row["objective"])
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
        self.paused: dict[str, dict] = {}
        """Trials paused at a rung -> their last objective, ``{"objective": value}``."""
        self.promotions_waiting = 0

    def has_room(self) -> bool:
        return len(self.live_trials) < self.max_concurrent

    def suggest(self, trial_id: str):
        if len(self.live_trials) + self.promotions_waiting >= self.max_concurrent:
            return None
        return super().suggest(trial_id)

    def pause(self, trial_id: str, result: dict) -> None:
        if trial_id in self.live_trials:
            self.live_trials.remove(trial_id)
            self.num_unfinished_live_trials -= 1
            self.paused[trial_id] = result

    def unpause(self, trial_id: str) -> None:
        if trial_id in self.paused:
            del self.paused[trial_id]
            self.live_trials.add(trial_id)
            self.num_unfinished_live_trials += 1

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.paused:  # stopped while waiting at a rung
            # Ray stops a paused trial with no result; the search learns its rung's value, as it does a trial
            # stopped while running (otherwise TPE would see it as pruned, with no value at all).
            rung_result = self.paused.pop(trial_id)
            self.searcher.on_trial_complete(trial_id, result=result or rung_result, error=error)
            return
        super().on_trial_complete(trial_id, result=result, error=error)
