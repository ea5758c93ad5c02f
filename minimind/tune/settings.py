"""The driver's choices for a sweep, saved in ``SWEEP/sweep.json`` so a restore and the report reuse them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from minimind import storage
from minimind.config import ConfigError

SAMPLERS = ("tpe", "random", "grid")


@dataclass
class SweepSettings:
    """The driver's choices, saved in ``SWEEP/sweep.json`` so a restore and the report reuse them."""

    name: str
    storage_path: str
    space_file: str
    cli_overrides: dict[str, Any]
    objective: str
    num_samples: int
    seed: int = 0
    sampler: str = "tpe"
    """``tpe`` (Optuna's TPE), ``random``, or ``grid`` (every combination of the space's values)."""
    startup_trials: int | None = None
    """``tpe``: trials drawn at random (the enqueued baseline and points among them) before TPE models
    the results; None: ``default_startup_trials(num_samples)``."""
    early_stopping: bool = True
    """ASHA stops the worst trials at its rungs; False: every trial trains its whole budget."""
    max_concurrent: int | None = None
    optuna_storage: str | None = None

    @property
    def sweep_dir(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"


SETTINGS_FILE = "sweep.json"


def save_settings(settings: SweepSettings) -> None:
    storage.write_text(storage.join(settings.sweep_dir, SETTINGS_FILE), json.dumps(asdict(settings), indent=1))


def load_settings(sweep_dir: str) -> SweepSettings:
    path = storage.join(sweep_dir, SETTINGS_FILE)
    if not storage.is_file(path):
        raise ConfigError(f"{sweep_dir}: not a sweep directory (no {SETTINGS_FILE})")
    return SweepSettings(**json.loads(storage.read_text(path)))


def default_startup_trials(num_samples: int) -> int:
    """A fifth of the sweep, at least 3: Optuna's own default (10) leaves a 12-trial sweep all but random."""
    return max(3, num_samples // 5)
