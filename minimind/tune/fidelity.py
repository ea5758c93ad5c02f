"""Rank fidelity: whether a sweep's early readings ranked trials as their final values did.

ASHA stops a trial on its value at a rung; that is sound only if the order at the rung is the order
at the end. For each rung this measures Spearman's rho between the trials' values there (the first
evaluation at or past the rung, as ASHA records it) and their final values, over the trials that
reached the end. Under early stopping those are the trials ASHA promoted, so a sweep measures its
own fidelity only over its survivors; ``benchmarks/rank_fidelity.py`` measures it on trials all
trained to the end. Plain numbers in, plain numbers out: no Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_TRIALS = 3
"""Fewer trials than this give no meaningful rank correlation."""
TRUSTED_RHO = 0.8
"""At or above this rho at every rung, a rung's order is (nearly) the final order."""


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda index: values[index])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rho (Pearson's correlation of the ranks); None with fewer than ``MIN_TRIALS``
    pairs or when either side is all ties."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} values against {len(ys)}")
    if len(xs) < MIN_TRIALS:
        return None
    rx, ry = ranks(xs), ranks(ys)
    mean_x, mean_y = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mean_x) * (b - mean_y) for a, b in zip(rx, ry))
    var_x = sum((a - mean_x) ** 2 for a in rx)
    var_y = sum((b - mean_y) ** 2 for b in ry)
    if var_x == 0 or var_y == 0:
        return None
    return cov / math.sqrt(var_x * var_y)


def value_at(evaluations: list[tuple[float, float]], milestone: float) -> float | None:
    """The objective of the first evaluation at or past ``milestone`` tokens (what ASHA records there)."""
    return next((value for tokens, value in sorted(evaluations) if tokens >= milestone), None)


@dataclass
class RungFidelity:
    milestone: float
    """The rung, in trained tokens."""
    trials: int
    """Trials that reached the end with a value at this rung."""
    rho: float | None
    """Spearman's rho between their values here and at the end; None when not measurable."""


def rank_fidelity(
    evaluations: dict[str, list[tuple[float, float]]], finals: dict[str, float], milestones: list[float]
) -> list[RungFidelity]:
    """Per rung, rho between the values there and ``finals`` (the trials that reached the end).

    ``evaluations``: each trial's (tokens, objective) readings. Direction does not matter: rho is the
    same whether lower or higher is better, as long as both sides are the same objective.
    """
    result = []
    for milestone in milestones:
        pairs = [(value_at(evaluations.get(tid, []), milestone), final) for tid, final in finals.items()]
        pairs = [(early, final) for early, final in pairs if early is not None]
        rho = spearman([early for early, _ in pairs], [final for _, final in pairs])
        result.append(RungFidelity(milestone, len(pairs), rho))
    return result


def fidelity_verdict(fidelities: list[RungFidelity], finished: int) -> str:
    """In words: could this sweep's early stopping be trusted?"""
    if not fidelities:
        return "The sweep has no rungs (no early stopping), so there is no early ranking to check."
    measured = [f for f in fidelities if f.rho is not None]
    if not measured:
        return (
            f"Rank fidelity cannot be measured here: {finished} trial(s) reached the end with a value at a rung, and "
            f"at least {MIN_TRIALS} are needed. A few trials run with `--no-early-stopping` measure it "
            "(`benchmarks/rank_fidelity.py` does so)."
        )
    worst = min(measured, key=lambda f: f.rho)
    survivors = " (over the trials that reached the end, which early stopping chose)"
    if worst.rho >= TRUSTED_RHO:
        return (
            f"Early stopping can be trusted in this sweep{survivors}: at every measured rung the order agrees with "
            f"the final order (lowest rho {worst.rho:.2f} at {worst.milestone:,.0f} tokens)."
        )
    return (
        f"Early stopping cannot be fully trusted in this sweep{survivors}: at the {worst.milestone:,.0f}-token "
        f"rung rho is {worst.rho:.2f}, so trials stopped there may have ended better. Judging on cooldown evaluations "
        "(`optim.schedule: wsd`, `eval.cooldown_fraction`) or a later `budget.grace_tokens` ranks more faithfully."
    )
