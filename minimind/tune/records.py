"""What a sweep leaves on disk, and reading it back: each trial's ``trials/<id>/trial.json`` next to
its run's ``metrics.jsonl``, and ASHA's decisions in ``SWEEP/asha.jsonl``. The report, a restored
scheduler and a restored trial are all built from these files (local or in object storage).
"""

from __future__ import annotations

import json

from minimind import storage
from minimind.tune.plan import RUNG_ATTR, TIME_ATTR, Objective

DECISIONS_FILE = "asha.jsonl"


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


def rung_position(row: dict) -> float:
    """Where an evaluation row stands against the rungs (:data:`~minimind.tune.plan.RUNG_ATTR`; rows
    written before it was reported: their real tokens)."""
    return float(row.get(RUNG_ATTR, row[TIME_ATTR]))


def trial_ids(sweep_dir: str) -> list[str]:
    """The trials that have a run directory in the sweep (sorted)."""
    return storage.list_dir(storage.join(sweep_dir, "trials"))


def asha_decisions(sweep_dir: str) -> list[dict]:
    """What :class:`TokenASHA` decided, in order (``SWEEP/asha.jsonl``)."""
    return read_rows(storage.join(sweep_dir, DECISIONS_FILE))


def pruned_trials(sweep_dir: str) -> dict[str, dict]:
    """The trials ASHA stopped, each with the tokens and objective it was stopped at."""
    return {row["trial_id"]: row for row in asha_decisions(sweep_dir) if row["decision"] == "stop"}


def wall_seconds_so_far(record: dict, stage_dirs: list[str]) -> float:
    """Time a trial has trained: recorded when it ended or waits at a rung; for one running or cut
    short, up to its last metrics line."""
    if record.get("status") in ("finished", "failed", "pruned", "waiting"):
        return float(record.get("wall_seconds", 0.0))
    started = record.get("attempt_started_at", record.get("started_at", 0.0))
    written = [storage.modified_time(storage.join(directory, "metrics.jsonl")) for directory in stage_dirs]
    last = max((mtime for mtime in written if mtime is not None), default=started)
    return float(record.get("wall_seconds", 0.0)) + max(0.0, last - started)
