"""Stage objectives: what a stage optimises, given the model and a collated batch.

Every objective returns a *sum* of per-target losses plus the number of targets it covers
(:meth:`Objective.normalizer`). The loop divides the summed loss of all micro-batches of one
optimizer step by their total count, so gradient accumulation averages over tokens (or pairs)
exactly, however unevenly they fall into micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minimind.data.formats import IGNORE_INDEX


@dataclass
class LossParts:
    loss_sum: torch.Tensor
    """Summed loss over the batch's targets (divide by the step's total normalizer)."""
    aux_loss: torch.Tensor
    """Per-batch regulariser (MoE load balance), weighted by the batch's share of the step."""
    metrics: dict[str, float]


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


class Objective:
    def normalizer(self, batch: dict[str, torch.Tensor]) -> float:
        raise NotImplementedError

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossParts:
        raise NotImplementedError


class LanguageModeling(Objective):
    """Next-token cross-entropy on labelled positions (pretrain, SFT, LoRA, reasoning).

    With ``weighted_ids`` (reasoning distillation), target tokens among those ids count
    ``token_weight`` times; the loss is the weighted mean, as in MiniMind's r1 training.
    """

    def __init__(self, weighted_ids: tuple[int, ...] = (), token_weight: float = 1.0, document_mask: bool = False):
        self.weighted_ids = weighted_ids
        self.token_weight = token_weight
        self.document_mask = document_mask

    def _weights(self, labels: torch.Tensor) -> torch.Tensor:
        targets = shifted(labels, labels)[1]
        weights = (targets != IGNORE_INDEX).float()
        if self.weighted_ids and self.token_weight != 1.0:
            special = torch.isin(targets, torch.tensor(self.weighted_ids, device=targets.device))
            weights = torch.where(special, weights * self.token_weight, weights)
        return weights

    def normalizer(self, batch):
        return float(self._weights(batch["labels"]).sum())

    def __call__(self, model, batch):
        document_ids = batch.get("document_ids") if self.document_mask else None
        logits, aux_loss, _ = model(batch["input_ids"], document_ids=document_ids)
        logits, labels = shifted(logits, batch["labels"])
        losses = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view_as(labels)
        weights = self._weights(batch["labels"])
        loss_sum = (losses * weights).sum()
        return LossParts(loss_sum, aux_loss, {})


class DPO(Objective):
    """Direct preference optimisation against a frozen reference model.

    The batch holds B chosen rows then B rejected rows. Sequence log-probs of the reply are
    summed (or averaged with ``length_normalize``); loss = -logsigmoid(beta * margin).
    """

    def __init__(self, reference: nn.Module, beta: float, length_normalize: bool = False):
        self.reference = reference.eval().requires_grad_(False)
        self.beta = beta
        self.length_normalize = length_normalize

    def normalizer(self, batch):
        return batch["input_ids"].shape[0] / 2

    def _sequence_log_probs(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits, aux_loss, _ = model(batch["input_ids"])
        log_probs, mask = token_log_probs(logits, batch["labels"])
        totals = log_probs.sum(-1)
        if self.length_normalize:
            totals = totals / mask.sum(-1).clamp(min=1)
        return totals, aux_loss

    def __call__(self, model, batch):
        policy, aux_loss = self._sequence_log_probs(model, batch)
        with torch.no_grad():
            reference, _ = self._sequence_log_probs(self.reference, batch)
        half = policy.shape[0] // 2
        policy_margin = policy[:half] - policy[half:]
        reference_margin = reference[:half] - reference[half:]
        logits = self.beta * (policy_margin - reference_margin)
        loss_sum = -F.logsigmoid(logits).sum()
        chosen_reward = self.beta * (policy[:half] - reference[:half]).detach()
        rejected_reward = self.beta * (policy[half:] - reference[half:]).detach()
        metrics = {
            "reward_accuracy": float((chosen_reward > rejected_reward).float().mean()),
            "reward_margin": float((chosen_reward - rejected_reward).mean()),
        }
        return LossParts(loss_sum, aux_loss, metrics)


class Distillation(Objective):
    """White-box distillation: (1-alpha) * CE + alpha * T^2 * KL(teacher_T || student_T) per token."""

    def __init__(self, teacher: nn.Module, alpha: float, temperature: float):
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha = alpha
        self.temperature = temperature

    def normalizer(self, batch):
        return float((shifted(batch["labels"], batch["labels"])[1] != IGNORE_INDEX).sum())

    def __call__(self, model, batch):
        logits, aux_loss, _ = model(batch["input_ids"])
        with torch.no_grad():
            teacher_logits, _, _ = self.teacher(batch["input_ids"])
        if teacher_logits.shape[-1] != logits.shape[-1]:
            raise ValueError(f"teacher vocabulary {teacher_logits.shape[-1]} != student vocabulary {logits.shape[-1]}")
        logits, labels = shifted(logits, batch["labels"])
        teacher_logits = teacher_logits[:, :-1]
        mask = labels != IGNORE_INDEX
        ce = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        t = self.temperature
        student_log = torch.log_softmax(logits.float() / t, dim=-1)
        teacher_log = torch.log_softmax(teacher_logits.float() / t, dim=-1)
        kl = (teacher_log.exp() * (teacher_log - student_log)).sum(-1) * (t * t)
        per_token = (1 - self.alpha) * ce + self.alpha * kl
        loss_sum = (per_token * mask).sum()
        targets = mask.sum().clamp(min=1)
        metrics = {"kl": float((kl.detach() * mask).sum() / targets), "ce": float((ce.detach() * mask).sum() / targets)}
        return LossParts(loss_sum, aux_loss, metrics)
