"""Cooldown evaluations: what a warmup-stable-decay run would score had it ended here.

Mid-run evaluations of a decaying schedule rank runs wrongly: a higher learning rate looks worse
while it is high and often ends better (Hägele et al. 2024; Wen et al. 2025). Under WSD the lr of the
stable phase does not depend on the run's length, so the run *as it would end* can be measured: branch
the weights and optimizer state, train the branch on the batches that come next with the decay the
schedule would apply (:func:`~minimind.train.schedule.cooldown_lr`), evaluate it, and put the state
back. The branch is the decay of a shorter run, and the main run goes on bit for bit as without it
(its data position, token count, RNG streams and non-finite check are untouched).

Every rank trains the branch (its steps hold the same collectives as training steps); rank 0
evaluates, as for every evaluation. The strategy copies and restores the state: under DDP the whole of
it, under DeepSpeed ZeRO each rank its own partition (``minimind/train/zero_branch.py``).
"""

from __future__ import annotations

import time

import torch

from minimind.train.checkpointing import rng_state, set_rng_state
from minimind.train.schedule import cooldown_lr, decay_start, decay_steps, set_learning_rate


def cooldown_steps(trainer, step: int) -> int:
    """Length of the cooldown branch evaluated at ``step``: 0 when off, once the decay has begun (an
    evaluation there is of the decaying run itself), or while the run's next step is still warming up.
    At the stable end of a run of one of ``eval.cooldown_durations``, that run's decay; elsewhere
    ``eval.cooldown_fraction`` of the steps so far."""
    evaluation, optim = trainer.config.eval, trainer.config.optim
    if step >= decay_start(trainer.total_steps, optim) or step + 1 < optim.warmup_steps:
        return 0  # in the warmup a branch would jump to the peak lr the run has not reached
    for duration in evaluation.cooldown_durations:
        if duration < trainer.total_steps and duration - decay_steps(duration, optim) == step:
            return decay_steps(duration, optim)
    return max(1, round(evaluation.cooldown_fraction * step)) if evaluation.cooldown_fraction else 0


def cooled_evaluation(trainer, steps: int, stable: dict) -> dict:
    """Train a branch ``steps`` steps from ``trainer.step``, evaluate it (rank 0), restore the run.

    ``stable``: rank 0's evaluation of the model as it is. Returns, on rank 0, the branch's metrics
    under their own names with ``stable``'s beside them as ``<name>_stable``, plus ``cooldown_steps``,
    ``cooldown_seconds`` and ``duration_tokens`` (the tokens of the run the branch ends: this run's
    so far plus the branch's); on the other ranks, ``{}``.
    """
    started = time.perf_counter()
    strategy, optim = trainer.strategy, trainer.config.optim
    saved = strategy.snapshot(trainer.model, trainer.optimizer)
    saved_rng = rng_state(trainer.device)
    saved_bad = trainer._first_bad_step.clone()
    scaler_state = trainer.scaler.state_dict() if trainer.scaler else None
    real_tokens = 0.0
    for index in range(steps):
        set_learning_rate(trainer.optimizer, cooldown_lr(index, steps, optim))
        stats = trainer.accumulate_gradients(trainer.step + index)
        real_tokens += float(stats["real_tokens"])
        trainer.optimizer_step()
    branch_tokens = int(strategy.all_reduce(torch.tensor(real_tokens, dtype=torch.float64, device=trainer.device)))
    trainer.cooldown_tokens += branch_tokens
    full_model = strategy.full_model(trainer.model)  # every rank calls: gathered under sharding
    cooled = trainer.evaluator(full_model) if trainer.evaluator else {}
    strategy.restore(trainer.model, trainer.optimizer, saved)
    set_rng_state(saved_rng, trainer.device)
    trainer._first_bad_step = saved_bad
    if trainer.scaler:
        trainer.scaler.load_state_dict(scaler_state)
    if not trainer.evaluator:
        return {}
    return {
        **cooled,
        **{f"{name}_stable": value for name, value in stable.items()},
        "cooldown_steps": steps,
        "cooldown_seconds": time.perf_counter() - started,
        "duration_tokens": trainer.tokens_trained + branch_tokens,
    }
