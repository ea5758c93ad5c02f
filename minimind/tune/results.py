"""A sweep's results, read from its directory: trial records, ``best.yaml`` and the report.

Everything here reads files the trials wrote (``trials/<id>/trial.json`` and ``metrics.jsonl``,
``asha.jsonl``), not Tune's internal state, so it works for a finished sweep, an interrupted
one, and one still running.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from minimind import storage
from minimind.config import TrainConfig, apply_overrides
from minimind.train.compute import tokens_per_step
from minimind.tune.plan import RUNG_ATTR, TIME_ATTR, SweepPlan, duration_steps, rung_milestones
from minimind.tune.records import (
    TrialFile,
    evaluations,
    pruned_trials,
    read_rows,
    rung_position,
    trial_ids,
    wall_seconds_so_far,
)
from minimind.tune.report import SweepSummary, TrialRecord, best_reading, best_trial, write_report
from minimind.tune.settings import SweepSettings
from minimind.tune.transfer import TransferredRecipe, transfer, transfer_cost

BEST_CONFIG = "best.yaml"
BEST_TARGET_CONFIG = "best-target.yaml"


def collect_records(plan: SweepPlan) -> list[TrialRecord]:
    """One record per trial that started, in start order."""
    pruned = pruned_trials(plan.sweep_dir)
    records = []
    trials = [TrialFile(plan.trial_dir(trial_id)).read() for trial_id in trial_ids(plan.sweep_dir)]
    for trial in sorted((t for t in trials if t), key=lambda t: t.get("started_at", 0.0)):
        judged = plan.judged_dir(trial["trial_id"])
        curve = read_rows(storage.join(judged, "metrics.jsonl"))
        evaluated = evaluations(judged, plan.objective)
        readings = [(rung_position(row), float(row["objective"])) for row in evaluated]
        # What the run would have scored, ended at each length: cooled readings, and the end of a finished run,
        # placed as the budget counts lengths (padding included, as durations_tokens are).
        durations = [(duration_position(row), float(row["objective"])) for row in evaluated
                     if "duration_tokens" in row]  # fmt: skip
        if evaluated and trial.get("status") == "finished":
            durations.append((rung_position(evaluated[-1]), float(evaluated[-1]["objective"])))
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
                tokens=tokens_trained(plan, trial["trial_id"]),
                wall_seconds=wall_seconds_so_far(trial, plan.stage_dirs(trial["trial_id"])),
                curve=curve,
                reason=reason,
                is_baseline=bool(trial.get("baseline")),
                evaluations=readings,
                durations=durations,
            )
        )
    return records


def duration_position(row: dict) -> float:
    """The length, in the budget's tokens (padding included), of the run a cooled reading ends: the row's step
    plus its branch's steps, at the row's tokens per step (rows from before budget tokens were logged: the
    real tokens the branch ended at)."""
    if RUNG_ATTR in row and row.get("step"):
        return float(row[RUNG_ATTR]) * (row["step"] + row["cooldown_steps"]) / row["step"]
    return float(row["duration_tokens"])


def tokens_trained(plan: SweepPlan, trial_id: str) -> int:
    """Tokens a trial trained, over all its stages, its cooldown branches' included."""
    total = 0
    for directory in plan.stage_dirs(trial_id):
        rows = read_rows(storage.join(directory, "metrics.jsonl"))
        if rows:
            total += int(rows[-1].get(TIME_ATTR, 0)) + max(int(row.get("cooldown_tokens", 0)) for row in rows)
    return total


def best_length(plan: SweepPlan, record: TrialRecord) -> tuple[float, float] | None:
    """A duration sweep's best length for ``record``: (its duration in tokens, the reading there), the best of
    its readings at the space's durations, ties to the shorter; None without durations or readings."""
    durations = plan.space.budget.durations_tokens
    reading = best_reading(record, durations, plan.objective.mode) if durations else None
    return None if reading is None else (durations[reading[1]], reading[0])


def write_best_configs(plan: SweepPlan, record: TrialRecord) -> list[tuple[str, str]]:
    """The best trial's configs as recipes their stages' entry points run as is, in runs of their own:
    ``best.yaml``, and for a pipeline ``best-<stage>.yaml`` per later stage (from the previous one's
    weights). Returns (file name, entry point) in the order to run them."""
    written = []
    configs = plan.stage_configs(record.params, "unused")
    names = [None, *(later.name for later in plan.space.then)]
    entry_points = [plan.space.stage, *(later.stage for later in plan.space.then)]
    directories = [f"runs/{plan.name}-best" + (f"-{name}" if name else "") for name in names]
    for index, (base, config) in enumerate(zip(plan.space.stage_bases(), configs)):
        file_name = f"best-{names[index]}.yaml" if index else BEST_CONFIG
        raw = apply_overrides(base, plan.space.stage_params(record.params, index))
        fixed = {"optim.max_steps": config.optim.max_steps, "eval.every_steps": config.eval.every_steps,
                 "checkpoint.every_steps": config.checkpoint.every_steps,
                 "checkpoint.dir": directories[index]}  # fmt: skip
        length = best_length(plan, record) if index == 0 else None
        if length is not None:  # the best length as a plain WSD run of that length (no branches)
            duration = length[0]
            steps = duration_steps(duration, tokens_per_step(config))
            fixed.update({"optim.max_steps": steps, "eval.cooldown_fraction": 0.0, "eval.cooldown_durations": [],
                          "eval.at_steps": []})  # fmt: skip
            budget = plan.space.budget
            if budget.durations_epochs:  # given in epochs: that many, the steps above the same length
                fixed["optim.epochs"] = budget.durations_epochs[budget.durations_tokens.index(duration)]
        if index:
            fixed["checkpoint.init_from"] = directories[index - 1]
        raw = apply_overrides(raw, fixed)
        path = storage.join(plan.sweep_dir, file_name)
        value = f"{record.objective:.6g}" if length is None else f"{length[1]:.6g} at {length[0]:,.0f} tokens"
        header = (
            f"# Best trial {record.trial_id} of sweep {plan.name}: {plan.objective.spec} = {value}\n"
            f"# Run it: python ray_jobs/{entry_points[index]}.py --config {path}\n"
        )
        storage.write_text(path, header + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
        written.append((file_name, entry_points[index]))
    if plan.space.target is not None:
        written.append((write_target_config(plan, record, configs[0]), plan.space.stage))
    return written


def target_recipe(plan: SweepPlan, record: TrialRecord, proxy: TrainConfig) -> TransferredRecipe:
    """The target recipe with ``record``'s tuned values (``proxy``: its run config)."""
    target = plan.space.target
    return transfer(target, proxy, {**target.proxy_overrides, **plan.space.stage_params(record.params, 0)})


def write_target_config(plan: SweepPlan, record: TrialRecord, proxy: TrainConfig) -> str:
    """``best-target.yaml``: the target recipe with the best proxy trial's values; returns its name."""
    recipe = target_recipe(plan, record, proxy)
    raw = apply_overrides(recipe.raw, {"checkpoint.dir": f"runs/{plan.name}-target"})
    path = storage.join(plan.sweep_dir, BEST_TARGET_CONFIG)
    header = [
        f"# The target {plan.space.target.recipe} with best trial {record.trial_id} of sweep {plan.name} "
        f"({plan.objective.spec} = {record.objective:.6g} on its proxy, width {proxy.model.hidden_size}; "
        f"μP base width {proxy.model.mup_base_width})",
        *(f"# {note}" for note in recipe.notes),
        f"# Run it: python ray_jobs/{plan.space.stage}.py --config {path}",
    ]
    storage.write_text(path, "\n".join(header) + "\n" + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return BEST_TARGET_CONFIG


def transfer_lines(plan: SweepPlan, records: list[TrialRecord], best: TrialRecord | None) -> list[str]:
    """What a proxy sweep says of its target: how best-target.yaml was made, and the sweep's cost
    against one target run in training FLOPs (empty for a sweep without a target)."""
    target = plan.space.target
    if target is None:
        return []
    lines = []
    if best is not None:
        lines += target_recipe(plan, best, plan.trial_config(best.params)).notes
    cost = transfer_cost(target, [(plan.trial_config(record.params), record.tokens) for record in records])
    trained = sum(record.tokens for record in records)
    lines.append(
        f"the sweep trained {trained:,} proxy tokens at {cost.proxy_flops_per_token:.3g} FLOPs each: "
        f"{cost.sweep_flops:.3g} FLOPs (6N + attention, the tied embedding once)"
    )
    if cost.fraction is None:
        lines.append(
            f"one target run's length is {cost.how}; at {cost.target_flops_per_token:.3g} FLOPs per target token "
            f"the sweep cost as much as {cost.sweep_flops / cost.target_flops_per_token:,.0f} target tokens"
        )
    else:
        lines.append(
            f"one target run: {cost.target_tokens:,.0f} tokens ({cost.how}) at {cost.target_flops_per_token:.3g} "
            f"FLOPs each, {cost.target_flops:.3g} FLOPs: the sweep cost {cost.fraction:.1%} of one target run"
        )
    return lines


def write_sweep_report(settings: SweepSettings, plan: SweepPlan) -> tuple[str, TrialRecord | None]:
    """``report.md``/``report.html``/plots and, when a trial has a result, ``best.yaml``; returns report.md's path.

    A sweep in object storage gets its report written locally first, then uploaded (the plots folder replaced
    whole, so no plot of an earlier report outlives it)."""
    records = collect_records(plan)
    best = best_trial(records, plan.objective.mode, plan.space.budget.durations_tokens)
    best_configs = write_best_configs(plan, best) if best is not None else []
    summary = SweepSummary(
        name=settings.name,
        objective=plan.objective.spec,
        mode=plan.objective.mode,
        num_samples=settings.num_samples,
        distributions=plan.space.distributions(),
        best_configs=best_configs,
        rungs=rung_milestones(plan.space.budget),
        durations=plan.space.budget.durations_tokens or [],
        duration_epochs=plan.space.budget.durations_epochs or [],
        transfer=transfer_lines(plan, records, best),
    )
    if not storage.is_uri(plan.sweep_dir):
        return str(write_report(Path(plan.sweep_dir), summary, records)), best
    with tempfile.TemporaryDirectory(prefix="minimind-report-") as local:
        write_report(Path(local), summary, records, location=plan.sweep_dir)
        storage.delete_dir(storage.join(plan.sweep_dir, "plots"))
        storage.upload(local, plan.sweep_dir)
    return storage.join(plan.sweep_dir, "report.md"), best
