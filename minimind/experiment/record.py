"""The provenance record of an experiment's invocation: ``STORAGE/NAME/experiment.json``.

It holds the git commit, the experiment file as it was (and the command line's settings over it), and for
every step its resolved config, hash, output, status for this invocation (cached, ran, failed, skipped), wall
time, and what the step reported (tokens, model FLOPs and GPU-hours for training, the scores for evaluation).
The previous record is what lets the next invocation say *why* a step runs again (``graph.plan``).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from minimind import storage
from minimind.experiment.graph import PlannedStep, resolved_config
from minimind.experiment.spec import Experiment

RECORD_FILE = "experiment.json"


def read_previous(experiment: Experiment) -> dict | None:
    path = storage.join(experiment.root, RECORD_FILE)
    if not storage.is_file(path):
        return None
    try:
        return json.loads(storage.read_text(path))
    except (OSError, ValueError):
        return None


def write_record(experiment: Experiment, planned: dict[str, PlannedStep], outcomes: dict, started: float) -> str:
    steps = {}
    for name, entry in planned.items():
        outcome = outcomes.get(name)
        steps[name] = {
            "kind": entry.step.kind,
            "hash": entry.hash,
            "output": entry.output,
            "parents": entry.step.parents,
            "status": outcome.status if outcome else "skipped",
            "seconds": round(outcome.seconds, 1) if outcome else 0.0,
            "summary": outcome.summary if outcome else {},
            "error": outcome.error if outcome else None,
            "config": resolved_config(planned, name),
            "changes": entry.step.changes,
            "identity": entry.identity,
        }
        if outcome is not None and outcome.status == "cached":
            steps[name]["summary"] = _done_summary(entry.output)
        if entry.step.kind == "train":
            steps[name]["gpu_hours"] = gpu_hours(steps[name])
    record = {
        "name": experiment.name,
        "file": experiment.path,
        "file_text": experiment.text,
        "settings": experiment.settings,
        "git_commit": git_commit(),
        "started_at": started,
        "finished_at": time.time(),
        "steps": steps,
    }
    path = storage.join(experiment.root, RECORD_FILE)
    storage.write_text(path, json.dumps(record, indent=1, ensure_ascii=False, default=str))
    return path


def train_seconds(step: dict) -> float:
    """A train step's time as its task measured it when it last ran (a cached step's too)."""
    return float((step.get("summary") or {}).get("seconds", step.get("seconds", 0.0)))


def gpu_hours(step: dict) -> float:
    """A train step's GPU-hours: its workers x GPUs per worker x its time when it last ran (start-up included);
    0 on CPU workers."""
    distributed = step["config"].get("distributed", {})
    if not distributed.get("use_gpu"):
        return 0.0
    gpus = distributed.get("num_workers", 1) * (distributed.get("gpus_per_worker", 1) or 1)
    return gpus * train_seconds(step) / 3600


def git_commit() -> str | None:
    """The commit of the code that ran (with ``+dirty`` when the working tree differs), if in a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def _done_summary(output: str) -> dict:
    from minimind.experiment.graph import DONE_FILE

    try:
        return json.loads(storage.read_text(storage.join(output, DONE_FILE))).get("summary", {})
    except (OSError, ValueError):
        return {}
