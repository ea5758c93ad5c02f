"""What a run costs before it runs: tokens per step, its length in tokens and its training FLOPs.

A run's length is its ``optim.max_steps`` when set; otherwise its epochs over its data, which is
opened (as the loop opens it) only to count the batches of an epoch. FLOPs follow the model's
count (:func:`minimind.model.flops_per_token`: 6N for the weights, the tied embedding once, the
active experts only, plus attention; under LoRA frozen weights get no weight gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from minimind.config import ModelConfig, TrainConfig
from minimind.data.dataset import build_training_data
from minimind.model import MiniMindLM, flops_per_token
from minimind.model.lora import apply_lora
from minimind.tokenizer import load_tokenizer


def tokens_per_step(config: TrainConfig) -> int:
    """Tokens one optimizer step trains over all workers (packed: every position a token)."""
    optim = config.optim
    return optim.batch_size * optim.grad_accum_steps * config.distributed.num_workers * config.data.seq_len


def model_flops_per_token(config: TrainConfig) -> float:
    """Training FLOPs per token of ``config``'s model at its sequence length.

    Counted from the config on the meta device (no weights allocated), never from a live model:
    once DeepSpeed ZeRO-3 has partitioned a model, its parameters' ``numel()`` is 0.

    N is the weights a token passes through (:func:`active_weights`), LoRA's adapters included, and
    N_trainable those of them that train. Per token a weight costs 2 FLOPs forward and, backward, 2
    for the gradient with respect to the activations, which flows through every weight, frozen or
    not, plus 2 for its own gradient, which only a trainable weight gets:
    2N + 2N + 2N_trainable, i.e. 6N without LoRA. Attention adds its 12 * layers * hidden * seq_len
    (no weights; its backward is the same whatever trains).
    """
    with torch.device("meta"):
        model = MiniMindLM(config.model)
        if config.lora.enabled:
            apply_lora(model, config.lora)  # freezes the base weights, adds the adapters
    weights = active_weights(model, config.model)
    frozen = weights - active_weights(model, config.model, trainable_only=True)
    return flops_per_token(config.model, weights, config.data.seq_len) - 2.0 * frozen


def active_weights(model: nn.Module, model_config: ModelConfig, trainable_only: bool = False) -> float:
    """Parameters one token passes through: each once (the tied embedding too), and of each layer's
    routed experts (adapters included) only the top_k of num_routed_experts a token is sent to."""
    moe = model_config.moe
    expert_share = moe.top_k / moe.num_routed_experts if moe.enabled else 1.0
    return sum(
        parameter.numel() * (expert_share if ".mlp.experts." in name else 1.0)
        for name, parameter in model.named_parameters()
        if parameter.requires_grad or not trainable_only
    )


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
    optim = config.optim
    # The loop stops at whichever comes first, optim.max_steps or the epochs over its data.
    try:
        epoch_steps = steps_per_epoch(config)
    except (OSError, ValueError):  # its corpus is not on this machine
        if optim.max_steps is None:
            raise
        epoch_steps = None
    if optim.max_steps is not None and (epoch_steps is None or optim.max_steps <= optim.epochs * epoch_steps):
        steps, how = optim.max_steps, f"optim.max_steps {optim.max_steps:,}"
        if epoch_steps is None:
            how += ", at most: its data is not on this machine to count its epochs"
    else:
        steps = optim.epochs * epoch_steps
        how = f"{optim.epochs} epoch(s) of {epoch_steps:,} steps over its data"
        if optim.max_steps is not None:
            how += f", before optim.max_steps {optim.max_steps:,}"
    tokens = steps * step_tokens
    return RunCost(steps, tokens, tokens * model_flops_per_token(config), how)


def steps_per_epoch(config: TrainConfig) -> int:
    """Optimizer steps of one epoch over ``config``'s training data, as the loop counts them."""
    data = build_training_data(config, load_tokenizer(config.data.tokenizer))
    batches = len(data.sampler(config.optim.batch_size, config.optim.seed, 0, config.distributed.num_workers))
    return math.ceil(batches / config.optim.grad_accum_steps)
