"""Command line of ``ray_jobs/experiment.py``: run an experiment file, redoing only what changed.

    python ray_jobs/experiment.py experiments/sample.yaml --dry-run    # what would run, what is cached, why
    python ray_jobs/experiment.py experiments/sample.yaml              # run it (again: only what changed)
    python ray_jobs/experiment.py experiments/sample.yaml --force sft  # run sft (and what follows) again
    python ray_jobs/experiment.py experiments/sample.yaml --set pretrain.overrides.optim.max_steps=24  # over the file
    ray job submit --working-dir . -- python ray_jobs/experiment.py experiments/sample.yaml

On local storage, ``STORAGE/NAME/STEP`` links to the output each step had in the last invocation
(``minimind chat --checkpoint runs/experiments/sample/sft``); ``experiment.json`` lists them everywhere.

Exit status: 0 when every step is done, 1 when a step failed (the others ran as far as they could),
2 for a bad experiment file (refused before Ray starts, naming file, line and field).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from minimind import storage
from minimind.config import ConfigError
from minimind.experiment.graph import plan
from minimind.experiment.record import read_previous
from minimind.experiment.spec import load_experiment


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ray_jobs/experiment.py",
        description="Run an experiment's steps on Ray; steps whose output is complete are skipped.",
    )
    parser.add_argument("experiment", help="the experiment file (YAML; see experiments/)")
    parser.add_argument(
        "--set",
        nargs="+",
        action="extend",  # several --set flags add up
        default=[],
        metavar="KEY=VALUE",
        dest="settings",
        help="values over the file's (YAML): name, storage_path, STEP.FIELD or STEP.overrides.DOTTED.FIELD",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the steps, what would run and why; run none")
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run just these steps (what they need must be done)")
    parser.add_argument(
        "--gpu-hour-usd", type=float, help="price of a GPU-hour: the experiment page shows each step's cost"
    )
    parser.add_argument(
        "--force", nargs="+", metavar="STEP", default=[], help="run these steps again, and the steps after them"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        experiment = load_experiment(args.experiment, args.settings)
        for flag, names in (("--only", args.only or []), ("--force", args.force)):
            unknown = [name for name in names if name not in experiment.steps]
            if unknown:
                named = ", ".join(map(repr, unknown))
                raise ConfigError(f"{flag}: no step {named} (steps: {', '.join(experiment.steps)})")
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if not storage.is_uri(experiment.storage_path):
        # Steps run in Ray tasks, not in this directory: outputs go where the path says from here (across
        # nodes, a path every node shares, or s3:// / gs://).
        experiment.storage_path = str(Path(experiment.storage_path).resolve())
    planned = plan(experiment, read_previous(experiment))
    force = set(args.force) | experiment.descendants(args.force)
    print_plan(experiment, planned, force, set(args.only) if args.only else None)
    if args.dry_run:
        return

    import ray

    from minimind.experiment.page import write_page
    from minimind.experiment.record import write_record
    from minimind.experiment.runner import link_outputs, run_experiment

    started = time.time()
    ray.init(ignore_reinit_error=True)
    outcomes = run_experiment(experiment, planned, force, set(args.only) if args.only else None)
    link_outputs(experiment, planned, outcomes)
    record = write_record(experiment, planned, outcomes, started)
    page = write_page(experiment.root, json.loads(storage.read_text(record)), args.gpu_hour_usd)
    counts = {status: sum(o.status == status for o in outcomes.values()) for status in ("ran", "cached", "failed")}
    print(f"[experiment] {counts['ran']} ran, {counts['cached']} cached, {counts['failed']} failed")
    print(f"[experiment] record: {record}; page: {page}")
    if counts["failed"] or any(o.status == "skipped" and o.error for o in outcomes.values()):
        raise SystemExit(1)


def print_plan(experiment, planned, force: set[str], only: set[str] | None) -> None:
    print(f"[experiment] {experiment.name}: {len(planned)} steps in {experiment.root}")
    for name, entry in planned.items():
        if only is not None and name not in only:
            state = "not asked for (--only)"
        elif name in force:
            state = "would run: forced (--force, or after a forced step)"
        elif entry.done:
            state = entry.reason
        else:
            state = f"would run: {entry.reason}"
        parents = f" <- {', '.join(entry.step.parent_names)}" if entry.step.parent_names else ""
        print(f"  {name} [{entry.step.kind} {entry.hash}]{parents}: {state}")
