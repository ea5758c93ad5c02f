"""What a run costs before it runs: tokens per step, its length in tokens and its training FLOPs.

A run's length is its ``optim.max_steps`` when set; otherwise its epochs over its data, which is
opened (as the loop opens it) only to count the batches of an epoch. FLOPs follow the model's
count (:func:`minimind.model.flops_per_token`: 6N for the weights, the tied embedding once, the
active experts only, plus attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from minimind.config import TrainConfig
from minimind.data.dataset import build_training_data
from minimind.model import MiniMindLM, flops_per_token
from minimind.tokenizer import load_tokenizer


def tokens_per_step(config: TrainConfig) -> int:
    """Tokens one optimizer step trains over all workers (packed: every position a token)."""
    optim = config.optim
    return optim.batch_size * optim.grad_accum_steps * config.distributed.num_workers * config.data.seq_len


def model_flops_per_token(config: TrainConfig) -> float:
    """Training FLOPs per token of ``config``'s model at its sequence length (no weights allocated)."""
    with torch.device("meta"):
        model = MiniMindLM(config.model)
    return flops_per_token(config.model, model.num_parameters(active_only=True), config.data.seq_len)


@dataclass
class RunCost:
    """How long a run trains and what that costs."""

    steps: int
    tokens: int
    """``steps * tokens_per_step``: positions trained, padding included."""
    flops: float
    how: str
    """Where the length came from, in words."""


def run_cost(config: TrainConfig) -> RunCost:
    """The length and training FLOPs of ``config``'s run (its data opened when it trains by epochs)."""
    step_tokens = tokens_per_step(config)
    if config.optim.max_steps is not None:
        steps, how = config.optim.max_steps, f"optim.max_steps {config.optim.max_steps:,}"
    else:
        epoch_steps = steps_per_epoch(config)
        steps = config.optim.epochs * epoch_steps
        how = f"{config.optim.epochs} epoch(s) of {epoch_steps:,} steps over its data"
    tokens = steps * step_tokens
    return RunCost(steps, tokens, tokens * model_flops_per_token(config), how)


def steps_per_epoch(config: TrainConfig) -> int:
    """Optimizer steps of one epoch over ``config``'s training data, as the loop counts them."""
    data = build_training_data(config, load_tokenizer(config.data.tokenizer))
    batches = len(data.sampler(config.optim.batch_size, config.optim.seed, 0, config.distributed.num_workers))
    return math.ceil(batches / config.optim.grad_accum_steps)
