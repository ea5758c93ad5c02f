"""A sweep's results, read from its directory: trial records, ``best.yaml`` and the report.

Everything here reads files the trials wrote (``trials/<id>/trial.json`` and ``metrics.jsonl``,
``pruned.jsonl``), not Tune's internal state, so it works for a finished sweep, an interrupted
one, and one still running.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from minimind.config import apply_overrides
from minimind.tune.report import SweepSummary, TrialRecord, best_trial, write_report
from minimind.tune.sweep import (
    TIME_ATTR,
    SweepPlan,
    SweepSettings,
    evaluations,
    pruned_trials,
    read_rows,
    wall_seconds_so_far,
)

BEST_CONFIG = "best.yaml"


def collect_records(plan: SweepPlan) -> list[TrialRecord]:
    """One record per trial that started, in start order."""
    sweep_dir = Path(plan.sweep_dir)
    pruned = pruned_trials(plan.sweep_dir)
    records = []
    trial_files = (sweep_dir / "trials").glob("*/trial.json")
    trials = [json.loads(path.read_text()) | {"dir": path.parent} for path in trial_files]
    for trial in sorted(trials, key=lambda t: t.get("started_at", 0.0)):
        trial_file = trial["dir"] / "trial.json"
        curve = read_rows(trial_file.parent / "metrics.jsonl")
        evaluated = evaluations(trial_file.parent, plan.objective)
        last_eval = evaluated[-1] if evaluated else {}
        objective = last_eval.pop("objective", None)
        status, reason = trial.get("status", "running"), trial.get("reason")
        if trial["trial_id"] in pruned and status != "failed":
            stop = pruned[trial["trial_id"]]
            status = "pruned"
            reason = f"stopped by ASHA at {stop[TIME_ATTR]:,} tokens ({plan.objective.spec} {stop['objective']:.4g})"
        records.append(
            TrialRecord(
                trial_id=trial["trial_id"],
                params=trial["params"],
                status=status,
                objective=objective,
                metrics={**(curve[-1] if curve else {}), **last_eval},
                tokens=int(curve[-1].get(TIME_ATTR, 0)) if curve else 0,
                wall_seconds=wall_seconds_so_far(trial, trial_file.parent),
                curve=curve,
                reason=reason,
                is_baseline=bool(trial.get("baseline")),
            )
        )
    return records


def write_best_config(plan: SweepPlan, record: TrialRecord) -> Path:
    """The best trial's config as a recipe its stage's entry point runs as is (in a run of its own)."""
    config = plan.trial_config(record.params)
    raw = apply_overrides(plan.space.base, record.params)
    raw = apply_overrides(raw, {"optim.max_steps": config.optim.max_steps, "eval.every_steps": config.eval.every_steps,
                                "checkpoint.every_steps": config.checkpoint.every_steps,
                                "checkpoint.dir": f"runs/{plan.name}-best"})  # fmt: skip
    header = (
        f"# Best trial {record.trial_id} of sweep {plan.name}: {plan.objective.spec} = {record.objective:.6g}\n"
        f"# Run it: python ray_jobs/{plan.space.stage}.py --config {Path(plan.sweep_dir) / BEST_CONFIG}\n"
    )
    path = Path(plan.sweep_dir) / BEST_CONFIG
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def write_sweep_report(settings: SweepSettings, plan: SweepPlan) -> tuple[Path, TrialRecord | None]:
    """``report.md``/``report.html``/plots and, when a trial has a result, ``best.yaml``."""
    records = collect_records(plan)
    best = best_trial(records, plan.objective.mode)
    best_file = None
    if best is not None:
        write_best_config(plan, best)
        best_file = BEST_CONFIG
    summary = SweepSummary(
        name=settings.name,
        objective=plan.objective.spec,
        mode=plan.objective.mode,
        num_samples=settings.num_samples,
        distributions=plan.space.distributions(),
        best_config_file=best_file,
        entry_point=plan.space.stage,
    )
    return write_report(Path(plan.sweep_dir), summary, records), best
