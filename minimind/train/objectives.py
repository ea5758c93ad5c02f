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
from minimind.eval.scoring import dpo_rewards, sequence_log_probs, shifted


@dataclass
class LossParts:
    loss_sum: torch.Tensor
    """Summed loss over the batch's targets (divide by the step's total normalizer)."""
    aux_loss: torch.Tensor
    """Per-batch regulariser (MoE load balance), weighted by the batch's share of the step."""
    metrics: dict[str, torch.Tensor]
    """Per-batch diagnostics as detached tensors (turned into numbers only when the loop logs)."""


class Objective:
    def normalizer(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Number of targets (tokens or pairs) in ``batch``, as a float tensor on the batch's device."""
        raise NotImplementedError

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossParts:
        raise NotImplementedError


class LanguageModeling(Objective):
    """Next-token cross-entropy on labelled positions (pretrain, SFT, LoRA, reasoning).

    With ``weighted_spellings`` (reasoning), target tokens that belong to a whole occurrence of one of those token
    sequences count ``token_weight`` times (only inside the labelled reply). A tag that is a single token is a
    one-id spelling; a tag the tokenizer lacks is matched by its multi-token spelling, so ``<answer>`` in
    MiniMind2's tokenizer weights its five tokens where they spell the tag, not every ``<`` or ``>`` elsewhere
    (MiniMind's r1 script weighted any occurrence of any of those ids). The weighted sum is divided by the sum of
    the weights (a weighted mean), or with ``normalize_by_tokens`` by the number of labelled tokens, as MiniMind's
    r1 script does (see ``objective.reasoning_normalizer``).
    """

    def __init__(
        self,
        weighted_spellings: tuple[tuple[int, ...], ...] = (),
        token_weight: float = 1.0,
        document_mask: bool = False,
        normalize_by_tokens: bool = False,
    ):
        self.weighted_spellings = tuple(tuple(spelling) for spelling in weighted_spellings if spelling)
        self.token_weight = token_weight
        self.document_mask = document_mask
        self.normalize_by_tokens = normalize_by_tokens
        self._spellings_on: dict[torch.device, list[torch.Tensor]] = {}

    def _weights(self, labels: torch.Tensor) -> torch.Tensor:
        targets = shifted(labels, labels)[1]
        weights = (targets != IGNORE_INDEX).float()
        if self.weighted_spellings and self.token_weight != 1.0:
            weights = torch.where(self._spelled(targets), weights * self.token_weight, weights)
        return weights

    def _spelled(self, targets: torch.Tensor) -> torch.Tensor:
        """Positions of ``targets`` covered by a complete occurrence of a weighted spelling."""
        # Copied to the device once: a copy from host memory per batch would wait for the GPU.
        spellings = self._spellings_on.get(targets.device)
        if spellings is None:
            spellings = self._spellings_on[targets.device] = [
                torch.tensor(spelling, device=targets.device) for spelling in self.weighted_spellings
            ]
        covered = torch.zeros_like(targets, dtype=torch.bool)
        for spelling in spellings:
            length = spelling.numel()
            if length > targets.shape[-1]:
                continue
            starts = (targets.unfold(-1, length, 1) == spelling).all(-1)  # (batch, positions - length + 1)
            for offset in range(length):
                covered[..., offset : offset + starts.shape[-1]] |= starts
        return covered

    def normalizer(self, batch):
        if self.normalize_by_tokens:
            return (shifted(batch["labels"], batch["labels"])[1] != IGNORE_INDEX).sum().float()
        return self._weights(batch["labels"]).sum()

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
        # Filled on the device (no copy from host memory, which would wait for the GPU).
        return torch.full((), batch["input_ids"].shape[0] / 2, device=batch["input_ids"].device)

    def __call__(self, model, batch):
        policy, aux_loss = sequence_log_probs(model, batch, self.length_normalize)
        with torch.no_grad():
            reference, _ = sequence_log_probs(self.reference, batch, self.length_normalize)
        chosen_reward, rejected_reward = dpo_rewards(policy, reference, self.beta)
        # -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
        loss_sum = -F.logsigmoid(chosen_reward - rejected_reward).sum()
        margin = (chosen_reward - rejected_reward).detach()
        metrics = {"reward_accuracy": (margin > 0).float().mean(), "reward_margin": margin.mean()}
        return LossParts(loss_sum, aux_loss, metrics)


class Distillation(Objective):
    """White-box distillation, per labelled token: ``ce_weight * CE + (1 - ce_weight) * T^2 *
    KL(teacher_T || student_T)``, MiniMind's ``alpha * CE + (1 - alpha) * KL`` with ``alpha = ce_weight``."""

    def __init__(self, teacher: nn.Module, ce_weight: float, temperature: float):
        self.teacher = teacher.eval().requires_grad_(False)
        self.ce_weight = ce_weight
        self.temperature = temperature

    def normalizer(self, batch):
        return (shifted(batch["labels"], batch["labels"])[1] != IGNORE_INDEX).sum().float()

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
        per_token = self.ce_weight * ce + (1 - self.ce_weight) * kl
        loss_sum = (per_token * mask).sum()
        targets = mask.sum().clamp(min=1)
        metrics = {"kl": (kl.detach() * mask).sum() / targets, "ce": (ce.detach() * mask).sum() / targets}
        return LossParts(loss_sum, aux_loss, metrics)
