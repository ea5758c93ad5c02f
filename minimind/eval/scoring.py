"""Log-probabilities of labelled tokens and of whole replies: shared by training objectives and eval."""

from __future__ import annotations

import torch

from minimind.data.formats import IGNORE_INDEX


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position t predicts token t+1: drop the last logit and the first label."""
    return logits[:, :-1], labels[:, 1:]


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target token [batch, seq-1] (0 where ignored) and the target mask."""
    logits, labels = shifted(logits, labels)
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return log_probs * mask, mask


def sequence_log_probs(model, batch: dict, length_normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (or mean) log-prob of each row's labelled tokens, and the model's aux loss."""
    logits, aux_loss, _ = model(batch["input_ids"])
    log_probs, mask = token_log_probs(logits, batch["labels"])
    totals = log_probs.sum(-1)
    if length_normalize:
        totals = totals / mask.sum(-1).clamp(min=1)
    return totals, aux_loss


def dpo_rewards(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit DPO rewards of the chosen (first half) and rejected (second half) rows."""
    half = policy.shape[0] // 2
    rewards = beta * (policy - reference)
    return rewards[:half], rewards[half:]
