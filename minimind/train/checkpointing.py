"""Training checkpoints: weights (safetensors) plus optimizer, scaler, RNG and data position.

Layout of a run directory::

    config.yaml  metrics.jsonl  latest
    checkpoints/step_00000100/{model.safetensors | adapter.safetensors, model.json, trainer_state.pt}

A checkpoint is written into a temporary folder and renamed into place, then ``latest`` is
replaced atomically, so a crash at any moment leaves the previous checkpoint intact and named.
``trainer_state.pt`` holds only tensors and plain values and is read with ``weights_only=True``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from minimind.config import config_to_dict
from minimind.model.checkpoint import ADAPTER_FILE, WEIGHTS_FILE, load_adapter, load_weights, read_meta, save_model

STATE_FILE = "trainer_state.pt"


class CheckpointManager:
    def __init__(self, config, rank: int = 0):
        self.config = config
        self.rank = rank
        self.run_dir = Path(config.checkpoint.dir)
        self.root = self.run_dir / "checkpoints"
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def latest_path(self) -> Path | None:
        latest = self.run_dir / "latest"
        if not latest.exists():
            return None
        return self.root / latest.read_text().strip()

    def save(self, trainer) -> Path:
        """Write the trainer's state at its current step (rank 0 writes, all ranks return the path)."""
        name = f"step_{trainer.step:08d}"
        final = self.root / name
        if self.rank != 0:
            return final
        temporary = self.root / f".tmp-{name}"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        lora = self.config.lora if self.config.lora.enabled else None
        save_model(
            trainer.model,
            temporary,
            lora=lora,
            base=self.config.checkpoint.init_from,
            extra={"step": trainer.step, "stage": self.config.stage, "tokenizer": trainer.tokenizer.fingerprint},
        )
        state = {
            "step": trainer.step,
            "epoch": trainer.step // trainer.steps_per_epoch,
            "step_in_epoch": trainer.step % trainer.steps_per_epoch,
            "optimizer": trainer.optimizer.state_dict(),
            "scaler": trainer.scaler.state_dict() if trainer.scaler else None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        torch.save(state, temporary / STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        pointer = self.run_dir / ".latest.tmp"
        pointer.write_text(name)
        os.replace(pointer, self.run_dir / "latest")
        self._prune(keep=name)
        return final

    def restore(self, trainer) -> int:
        """Load the newest checkpoint into ``trainer`` when resuming; return the step to start at."""
        path = self.latest_path()
        if not self.config.checkpoint.resume or path is None:
            return 0
        meta = read_meta(path)
        if meta["model"] != config_to_dict(trainer.model.config):
            raise ValueError(f"{path} was written by a different model configuration than this run's")
        if (path / WEIGHTS_FILE).exists():
            load_weights(trainer.model, path / WEIGHTS_FILE)
        if (path / ADAPTER_FILE).exists():
            load_adapter(trainer.model, path / ADAPTER_FILE)
        state = torch.load(path / STATE_FILE, map_location=trainer.device, weights_only=True)
        trainer.optimizer.load_state_dict(state["optimizer"])
        if trainer.scaler and state["scaler"]:
            trainer.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng_cuda"]])
        if self.rank == 0:
            print(f"[checkpoint] resumed from {path} at step {state['step']}", flush=True)
        return int(state["step"])

    def _prune(self, keep: str) -> None:
        finished = sorted(p for p in self.root.iterdir() if p.name.startswith("step_"))
        for old in finished[: max(0, len(finished) - self.config.checkpoint.keep_last)]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)
