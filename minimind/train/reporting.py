"""What a run tells its user (rank 0 only): a progress line, ``metrics.jsonl``/``config.yaml`` in the
run directory, and optionally Weights & Biases.

The run directory may be local or a pyarrow URI (``s3://``, ``gs://``): object stores cannot
append, so there ``metrics.jsonl`` is rewritten whole at each log step (it holds one line per log).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from minimind import storage
from minimind.config import TrainConfig, config_to_dict
from minimind.storage import is_uri

WANDB_RECORD = "wandb.json"
"""In a run directory logged to W&B: where that run is (``WandbLogger``)."""


class RunFiles:
    """``config.yaml``, ``metrics.jsonl`` and the ``latest`` pointer of one run directory."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.remote = is_uri(run_dir)
        self._lines: list[str] = []
        if self.remote:
            fs, root = storage.filesystem(run_dir)
            fs.create_dir(root, recursive=True)
            # A resumed run keeps the lines logged before the interruption, as an appended local file does.
            metrics_file = storage.join(run_dir, "metrics.jsonl")
            if storage.is_file(metrics_file):
                self._lines = storage.read_text(metrics_file).splitlines(keepends=True)
        else:
            Path(run_dir).mkdir(parents=True, exist_ok=True)

    def _write(self, name: str, text: str) -> None:
        # Whole files only, so a reader (or a crash) never sees half a file.
        storage.write_text(storage.join(self.run_dir, name), text)

    def write_config(self, config: TrainConfig) -> None:
        self._write("config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True))

    def write_latest(self, checkpoint_name: str) -> None:
        self._write("latest", checkpoint_name)

    def append_metrics(self, metrics: dict) -> None:
        line = json.dumps(metrics) + "\n"
        if self.remote:
            self._lines.append(line)
            self._write("metrics.jsonl", "".join(self._lines))
            return
        with open(Path(self.run_dir) / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(line)


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def progress_line(stage: str, metrics: dict, total_steps: int, eta_seconds: float | None) -> str:
    """``[pretrain] step 120/868 loss 5.612 | tokens/s 12.3k | eta 3m05s | lr 4.9e-04 ...``."""
    head = f"[{stage}] step {metrics['step']}/{total_steps}"
    parts = []
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
    if "tokens_per_second" in metrics:
        parts.append(f"tokens/s {metrics['tokens_per_second'] / 1e3:.1f}k")
    if eta_seconds is not None:
        parts.append(f"eta {format_duration(eta_seconds)}")
    shown = {"step", "loss", "tokens_per_second"}
    rest = " ".join(
        f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
        for key, value in metrics.items()
        if key not in shown
    )
    return " | ".join([head + (" " + parts[0] if parts else "")] + parts[1:] + ([rest] if rest else []))


class WandbLogger:
    """Metrics to Weights & Biases; offline (files under the run directory) when no API key is set.

    The run id is the run directory's name, so a resumed run continues the same W&B run; its files
    go into a local run directory (``runs/wandb`` when the run lives in object storage). The key is
    read by wandb from the environment and never printed here. ``wandb.json`` in the run directory says
    where the W&B run is (its URL, or the offline directory to ``wandb sync``), for the experiment page.
    """

    def __init__(self, config: TrainConfig):
        try:
            import wandb
        except ImportError:
            raise RuntimeError("logging.wandb needs the wandb package: pip install 'minimind-ray[wandb]'") from None
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        run_dir = config.checkpoint.dir or "runs/minimind"
        run_name = run_dir.rstrip("/").rpartition("/")[2]
        local_dir = str(Path("runs") / "wandb") if is_uri(run_dir) else run_dir
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=config.logging.wandb_project,
            name=run_name,
            id=run_name,
            resume="allow",
            mode=mode,
            dir=local_dir,
            config=config_to_dict(config),
        )
        where = {"project": config.logging.wandb_project, "id": run_name, "mode": mode,
                 "url": self.run.url if mode == "online" else None,
                 "offline_dir": None if mode == "online" else str(Path(self.run.dir).parent.resolve())}  # fmt: skip
        storage.write_text(storage.join(run_dir, WANDB_RECORD), json.dumps(where))

    def log(self, metrics: dict) -> None:
        self.run.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])

    def close(self) -> None:
        self.run.finish()
