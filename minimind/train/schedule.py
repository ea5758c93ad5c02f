"""Learning-rate schedules, as functions of the optimizer step (so a resumed run is where it was).

- ``cosine`` (MiniMind's): linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the
  last step.
- ``wsd``, warmup-stable-decay (MiniCPM; Hägele et al. 2024, arXiv 2405.18392): linear warmup, ``lr``
  held constant, then a decay over the last ``decay_fraction`` of the steps to ``lr * min_lr_ratio``,
  shaped ``linear``, ``sqrt`` (the paper's 1-sqrt) or ``cosine``. Until the decay begins the lr does
  not depend on the run's length, so a run can be extended, and a *cooldown branch* started at any
  stable step ``t`` and decayed over ``n`` steps is exactly the run of length ``t + n`` would be
  (:func:`cooldown_lr`; used by the loop's cooldown evaluations).
"""

from __future__ import annotations

import math

import torch

from minimind.config.schema import DECAY_SHAPES


def decay_factor(progress: float, shape: str) -> float:
    """How much of the lr above the floor is left ``progress`` (0..1) into a decay."""
    progress = min(1.0, max(0.0, progress))
    if shape == "linear":
        return 1.0 - progress
    if shape == "sqrt":
        return 1.0 - math.sqrt(progress)
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"optim.decay_shape: unknown shape {shape!r}; choose from {DECAY_SHAPES}")


def decay_steps(total_steps: int, optim) -> int:
    """How many of a WSD run's last steps decay: ``decay_fraction`` of them, at least one, never
    reaching into the warmup."""
    wanted = max(1, round(optim.decay_fraction * total_steps))
    return max(1, min(wanted, total_steps - optim.warmup_steps))


def decay_start(total_steps: int, optim) -> int:
    """The first step whose lr is below the peak for its schedule's sake: for cosine the end of the
    warmup, for WSD the start of its decay."""
    if optim.schedule == "cosine":
        return min(optim.warmup_steps, total_steps)
    return max(0, total_steps - decay_steps(total_steps, optim))


def learning_rate(step: int, total_steps: int, optim) -> float:
    """The lr of optimizer step ``step`` of a run of ``total_steps`` steps."""
    peak, floor = optim.lr, optim.lr * optim.min_lr_ratio
    if step < optim.warmup_steps:
        return peak * (step + 1) / optim.warmup_steps
    if optim.schedule == "cosine":
        span = max(1, total_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
    start = decay_start(total_steps, optim)
    if step < start:
        return peak
    # The decay's last step trains at the floor.
    return cooldown_lr(step - start, total_steps - start, optim)


def cooldown_lr(index: int, length: int, optim) -> float:
    """The lr of step ``index`` (0-based) of a decay ``length`` steps long that starts from ``lr``."""
    peak, floor = optim.lr, optim.lr * optim.min_lr_ratio
    return floor + (peak - floor) * decay_factor((index + 1) / length, optim.decay_shape)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr: ``lr`` times the group's ``lr_scale`` (μP's per-parameter factor; 1 otherwise)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
