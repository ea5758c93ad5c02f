"""Where each step's output lives, whether it is already there, and why a step would run.

A step's output is ``STORAGE/NAME/STEP-<hash>``. The hash covers the step's kind, its resolved config
(other steps' outputs as ``${step}``, so it does not depend on where outputs live), the content identity of
the files it reads that no step writes, and its parents' hashes: a change anywhere upstream gives a new
directory, and nothing stale is ever reused. A step is done when its output holds ``step.json``, written
last, with its hash. Code changes are not in the hash (the provenance record names the commit).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from minimind import storage
from minimind.experiment.spec import SELF, Experiment, Step, dotted_changes, output_of

HASH_VERSION = 1
DONE_FILE = "step.json"
SMALL_FILE = 64 << 20  # files up to this size are identified by their content, larger ones by size and mtime


@dataclass
class PlannedStep:
    step: Step
    hash: str
    output: str
    done: bool
    reason: str
    """Why it is cached or would run, in words."""
    identity: dict
    """What the hash covers (kept in the provenance record, so a later run can say what changed)."""

    @property
    def name(self) -> str:
        return self.step.name


def plan(experiment: Experiment, previous: dict | None = None) -> dict[str, PlannedStep]:
    """Every step's hash, output and state, in dependency order. ``previous`` is the last provenance
    record (``experiment.json``), used only to say what changed."""
    planned: dict[str, PlannedStep] = {}
    previous_steps = (previous or {}).get("steps", {})
    for name in experiment.order():
        step = experiment.steps[name]
        identity = {
            "version": HASH_VERSION,
            "kind": step.kind,
            "config": step.config,
            "parents": {parent: planned[parent].hash for parent in step.parent_names},
            "inputs": {path: input_identity(path) for path in step.inputs},
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
        output = storage.join(experiment.root, f"{name}-{digest}")
        done = is_done(output, digest)
        before = previous_steps.get(name)
        reason = "cached: its output is complete" if done else _why_run(output, digest, identity, before)
        planned[name] = PlannedStep(step, digest, output, done, reason, identity)
    return planned


def is_done(output: str, digest: str) -> bool:
    marker = storage.join(output, DONE_FILE)
    if not storage.is_file(marker):
        return False
    try:
        return json.loads(storage.read_text(marker)).get("hash") == digest
    except (OSError, ValueError):
        return False


def resolved_config(planned: dict[str, PlannedStep], name: str):
    """The step's config with ``${step}`` and ``${self}`` replaced by the output directories."""
    outputs = {output_of(other): entry.output for other, entry in planned.items()}
    outputs[SELF] = planned[name].output

    def substitute(value: str) -> str:
        if value.startswith("${"):
            placeholder, slash, rest = value.partition("/")  # a file in another step's output: ${sweep}/best.yaml
            return outputs[placeholder] + slash + rest if placeholder in outputs else value
        return value

    return map_strings(planned[name].step.config, substitute)


def map_strings(value, change):
    """``value`` (nested dicts and lists) with every string ``s`` replaced by ``change(s)``."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, list):
        return [map_strings(item, change) for item in value]
    if isinstance(value, dict):
        return {key: map_strings(item, change) for key, item in value.items()}
    return value


def input_identity(path: str) -> dict:
    """Content identity of a file or directory read by a step: a content hash for small files, size and
    modification time for large ones and for each file of a directory."""
    if storage.is_uri(path):
        filesystem, inner = storage.filesystem(path)
        info = filesystem.get_file_info(inner)
        return {"size": info.size, "mtime": info.mtime.timestamp() if info.mtime else None}
    local = Path(path)
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file())
        listing = [(str(p.relative_to(local)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return {"files": len(files), "listing": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}
    size = local.stat().st_size
    if size <= SMALL_FILE:
        return {"size": size, "sha256": _sha256(local)}
    return {"size": size, "mtime_ns": local.stat().st_mtime_ns}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _why_run(output: str, digest: str, identity: dict, before: dict | None) -> str:
    if _exists(output):
        return "started before and not finished: it goes on from what it left (training from its checkpoint)"
    if before is None or before.get("hash") in (None, digest):
        return "not run yet"
    old = before.get("identity") or {}
    changes = dotted_changes(old.get("config", {}), identity["config"])
    changed_parents = [p for p, h in identity["parents"].items() if old.get("parents", {}).get(p) != h]
    changed_inputs = [i for i, v in identity["inputs"].items() if old.get("inputs", {}).get(i) != v]
    reasons = []
    if changes:
        reasons.append("config changed: " + ", ".join(changes[:4]) + (" ..." if len(changes) > 4 else ""))
    if changed_parents:
        reasons.append("new output of " + ", ".join(changed_parents))
    if changed_inputs:
        reasons.append("input changed: " + ", ".join(changed_inputs))
    return "; ".join(reasons) or "its hash changed"


def _exists(path: str) -> bool:
    return bool(storage.list_dir(path))
