"""Training checkpoints: weights (safetensors) plus optimizer, scaler, per-rank RNG and data position.

Layout of a run directory, the same for an in-process run and a Ray Train run (Ray names each
reported checkpoint ``step_N`` and adds its own bookkeeping files beside them)::

    config.yaml  metrics.jsonl  latest
    step_00000100/{model.safetensors | adapter.safetensors, model.json, trainer_state.pt}

A DeepSpeed run's checkpoints hold the engine's shards in ``deepspeed/`` instead of the optimizer
state (and, but for the run's last one, instead of the weights; see ``minimind.train.zero``).

In process, a checkpoint is written into a temporary folder and renamed into place, then
``latest`` is replaced atomically, so a crash at any moment leaves the previous checkpoint intact.
``trainer_state.pt`` holds only tensors and plain values and is read with ``weights_only=True``.
Data position is a function of the optimizer step, so the step is all a resume needs to find its
place; the run's world size and global batch are stored so a resume that would change either is
refused instead of silently training on a different order.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch

from minimind.config import config_to_dict
from minimind.model.checkpoint import (
    ADAPTER_FILE,
    WEIGHTS_FILE,
    load_adapter,
    load_weights,
    model_config_from_dict,
    read_meta,
    resolve_checkpoint,
    save_model,
)
from minimind.train.schedule import decay_start

STATE_FILE = "trainer_state.pt"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(name: str) -> int:
    """The step of a checkpoint folder named by :func:`checkpoint_name`."""
    return int(name.removeprefix("step_"))


def rng_state(device: torch.device) -> dict:
    """This worker's random streams: the CPU's and its own GPU's (not every visible GPU's, whose
    indices mean other devices on another node or after a restart)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    own = own_gpu_stream(state, device)
    if own is not None:
        torch.cuda.set_rng_state(own, device)


def own_gpu_stream(state: dict, device: torch.device) -> torch.Tensor | None:
    """The saved random stream of ``device``'s GPU (None on CPU): the one stream a checkpoint holds, or, in one
    written before one device per worker (a list, one stream per visible GPU), the entry of ``device``'s index."""
    own = state.get("cuda")
    if isinstance(own, list):
        own = own[device.index or 0] if own and device.type == "cuda" else None
    return own if device.type == "cuda" else None


def write_checkpoint(trainer, directory: Path, rng_states: list[dict]) -> None:
    """Weights and trainer state of ``trainer`` into ``directory``.

    Rank 0 calls this, or every rank under a sharded strategy (DeepSpeed), whose ranks each write
    their shards; rank 0 adds ``model.json``, the trainer state and, at the end of the run, the
    gathered full weights.
    """
    config = trainer.config
    strategy = trainer.strategy
    if strategy.sharded:
        strategy.save_sharded(directory)
    # A sharded run gathers full weights only at its end (`minimind consolidate` does it on demand).
    with_weights = trainer.step >= trainer.total_steps or not strategy.sharded
    model = strategy.full_model(trainer.model) if with_weights else trainer.model
    if strategy.rank != 0:
        return
    lora = config.lora if config.lora.enabled else None
    extra = {"step": trainer.step, "stage": config.stage, "tokenizer": trainer.tokenizer.fingerprint}
    if strategy.sharded:
        extra["sharded"] = strategy.name
    save_model(
        model,
        directory,
        lora=lora,
        base=config.checkpoint.init_from,
        extra=extra,
        weights=with_weights,
    )
    state = {
        "step": trainer.step,
        "epoch": trainer.step // trainer.steps_per_epoch,
        "step_in_epoch": trainer.step % trainer.steps_per_epoch,
        "world_size": trainer.strategy.world_size,
        "batch_size": config.optim.batch_size,
        "grad_accum_steps": config.optim.grad_accum_steps,
        "strategy": strategy.name,
        "tokens": trainer.tokens_trained,
        "cooldown_tokens": trainer.cooldown_tokens,
        "total_steps": trainer.total_steps,
        "optimizer": None if strategy.sharded else trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler else None,
        "rng": rng_states,
    }
    torch.save(state, directory / STATE_FILE)


def load_checkpoint(trainer, directory: Path) -> int:
    """Restore ``trainer`` from ``directory`` (every rank calls this); return the step to continue at."""
    meta = read_meta(directory)
    # Read as a config, so fields added to ModelConfig since the checkpoint was written take their defaults:
    # a run resumes under a newer version of this code as long as the model is the same.
    there = config_to_dict(model_config_from_dict(meta["model"]))
    here = config_to_dict(trainer.model.config)
    if there != here:
        differ = sorted(key for key in there.keys() | here.keys() if there.get(key) != here.get(key))
        fields = ", ".join(f"model.{key} {there.get(key)!r} there, {here.get(key)!r} here" for key in differ)
        raise ValueError(f"{directory} was written by a different model configuration than this run's: {fields}")
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    optim = trainer.config.optim
    saved = (state["world_size"], state["batch_size"], state["grad_accum_steps"])
    wanted = (trainer.strategy.world_size, optim.batch_size, optim.grad_accum_steps)
    if saved != wanted:
        raise ValueError(
            f"{directory} was written by {saved[0]} worker(s) x batch {saved[1]} x accumulation {saved[2]}; "
            f"this run has {wanted[0]} x {wanted[1]} x {wanted[2]}. Its data position cannot carry over: "
            "resume with the same workers and batch, or start a new run from its weights with "
            f"--checkpoint.init_from {directory}"
        )
    check_schedule(trainer, state, directory)
    strategy = trainer.strategy
    if state.get("strategy", "ddp") != strategy.name:
        raise ValueError(
            f"{directory} was written under strategy {state.get('strategy', 'ddp')}; this run uses {strategy.name}, "
            "whose optimizer state has another layout. Resume with the same strategy, or start a new run from "
            f"its weights with --checkpoint.init_from {directory}"
        )
    if strategy.sharded:
        strategy.load_sharded(directory)  # weights and optimizer partitions, each rank its own
    else:
        if (directory / WEIGHTS_FILE).exists():
            load_weights(trainer.model, directory / WEIGHTS_FILE)
        if (directory / ADAPTER_FILE).exists():
            load_adapter(trainer.model, directory / ADAPTER_FILE)
        trainer.optimizer.load_state_dict(state["optimizer"])
    if trainer.scaler and state["scaler"]:
        trainer.scaler.load_state_dict(state["scaler"])
    # Rank 0 carries the run's token count on; the workers' sum stays the total.
    trainer.tokens_trained = int(state.get("tokens", 0))
    trainer.cooldown_tokens = int(state.get("cooldown_tokens", 0))
    trainer.local_tokens = float(trainer.tokens_trained) if trainer.strategy.rank == 0 else 0.0
    set_rng_state(state["rng"][trainer.strategy.rank], trainer.device)
    return int(state["step"])


def check_schedule(trainer, state: dict, directory: Path) -> None:
    """A run resumed with another length (``max_steps``, ``epochs``) continues only where every step
    trained so far had the lr the new length gives it: before a WSD run's decay (or a cosine run's
    warmup end). Past that point the lr would jump back up; that is refused."""
    step, saved_total, total = int(state["step"]), state.get("total_steps"), trainer.total_steps
    if saved_total is None or saved_total == total:
        return
    optim = trainer.config.optim
    unchanged_until = min(decay_start(saved_total, optim), decay_start(total, optim))
    if step > unchanged_until:
        raise ValueError(
            f"{directory} is step {step} of a {saved_total}-step run; this run has {total} steps, and its "
            f"{optim.schedule} schedule gives the steps from {unchanged_until} on another lr than the run trained "
            "with. Only a wsd run whose decay has not begun can be extended: resume with the old length, or start "
            f"a new run from its weights with --checkpoint.init_from {directory}"
        )
    if trainer.strategy.rank == 0:
        print(
            f"[schedule] extended from {saved_total} to {total} steps at step {step}; "
            f"the decay now begins at step {decay_start(total, optim)}",
            flush=True,
        )


class LocalRun:
    """The loop's checkpoint store for an in-process run: ``checkpoint.dir`` on this machine."""

    def __init__(self, config):
        self.run_dir = Path(config.checkpoint.dir)
        self.keep_last = config.checkpoint.keep_last
        self.resume = config.checkpoint.resume
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def resume_directory(self):
        """Context giving the checkpoint directory to resume from, or None."""
        latest = None
        if self.resume:
            with contextlib.suppress(FileNotFoundError):
                latest = resolve_checkpoint(self.run_dir)
        return contextlib.nullcontext(latest)

    def publish(self, trainer, metrics: dict | None, save: bool, evaluated: bool = False) -> Path | None:
        if not save:
            return None
        name = checkpoint_name(trainer.step)
        final = self.run_dir / name
        temporary = self.run_dir / f".tmp-{name}"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        write_checkpoint(trainer, temporary, [rng_state(trainer.device)])
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        trainer.files.write_latest(name)
        self._prune(keep=name)
        return final

    def _prune(self, keep: str) -> None:
        finished = sorted(p for p in self.run_dir.iterdir() if p.name.startswith("step_"))
        for old in finished[: max(0, len(finished) - self.keep_last)]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)
