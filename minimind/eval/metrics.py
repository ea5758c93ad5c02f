"""Evaluation metrics: held-out perplexity and bits per byte, continuation (接龙) score, chat-format
adherence and DPO preference accuracy. All are deterministic for a fixed model and subset.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from minimind.eval.scoring import dpo_rewards, sequence_log_probs, shifted, token_log_probs
from minimind.model.generate import generate


@torch.no_grad()
def perplexity_sums(model, batches: Iterable[dict], token_bytes: torch.Tensor) -> list[float]:
    """``[total NLL, target tokens, target bytes]`` over the batches; sums add across shards."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    for batch in batches:
        logits, _, _ = model(batch["input_ids"])
        log_probs, mask = token_log_probs(logits, batch["labels"])
        targets = shifted(batch["labels"], batch["labels"])[1]
        byte_counts = token_bytes.to(targets.device)[targets.clamp(min=0)] * mask
        totals += torch.tensor(
            [float(-log_probs.sum()), float(mask.sum()), float(byte_counts.sum())], dtype=torch.float64
        )
    return totals.tolist()


def perplexity_from_sums(nll: float, tokens: float, num_bytes: float) -> dict:
    """Token-weighted mean NLL, its exp, and bits per UTF-8 byte.

    Bits per byte divides the total NLL (in bits) by the bytes the target tokens spell, so it is
    comparable across tokenizers.
    """
    if tokens == 0:
        raise ValueError("no labelled tokens to evaluate")
    mean = nll / tokens
    return {
        "val_loss": mean,
        "val_perplexity": math.exp(mean),
        "val_bits_per_byte": nll / math.log(2) / max(num_bytes, 1.0),
        "val_tokens": int(tokens),
    }


def perplexity(model, batches: Iterable[dict], token_bytes: torch.Tensor) -> dict:
    """Held-out perplexity and bits per byte of ``model`` over ``batches``."""
    return perplexity_from_sums(*perplexity_sums(model, batches, token_bytes))


@torch.no_grad()
def continuation_score(
    model, documents: Sequence[Sequence[int]], prefix_tokens: int, continuation_tokens: int, max_docs: int | None = None
) -> dict:
    """Greedy continuation of held-out documents: exact-token accuracy and teacher-forced log-likelihood.

    The first ``max_docs`` documents long enough give their first ``prefix_tokens`` as the prompt;
    the model greedily writes ``continuation_tokens`` more, compared position by position with the
    true text. Without a long enough document there is nothing to score and the result is empty.
    """
    model.eval()
    device = model.lm_head.weight.device
    length = prefix_tokens + continuation_tokens
    usable = [list(doc[:length]) for doc in documents if len(doc) >= length][:max_docs]
    if not usable:
        return {}
    correct, loglik = 0, 0.0
    for doc in usable:
        truth = doc[prefix_tokens:]
        produced = generate(model, doc[:prefix_tokens], max_new_tokens=continuation_tokens, temperature=0, eos_id=None)
        correct += sum(int(a == b) for a, b in zip(produced, truth))
        logits, _, _ = model(torch.tensor([doc], device=device))
        predictions = torch.log_softmax(logits[0, prefix_tokens - 1 : length - 1].float(), dim=-1)
        loglik += float(predictions.gather(-1, torch.tensor(truth, device=device)[:, None]).sum())
    count = len(usable) * continuation_tokens
    return {
        "continuation_accuracy": correct / count,
        "continuation_loglik": loglik / count,
        "continuation_docs": len(usable),
    }


@torch.no_grad()
def chat_adherence(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 128) -> dict:
    """Fraction of greedy chat replies that end with ``<|im_end|>`` within ``max_new_tokens``."""
    ended = 0
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        reply = generate(
            model, tokenizer.encode(text), max_new_tokens=max_new_tokens, temperature=0, eos_id=tokenizer.eos_id
        )
        ended += int(bool(reply) and reply[-1] == tokenizer.eos_id)
    return {"chat_adherence": ended / len(prompts)}


@torch.no_grad()
def preference_sums(model, reference, batches: Iterable[dict], beta: float) -> list[float]:
    """``[pairs where chosen wins, summed reward margin, pairs]``; sums add across shards."""
    model.eval()
    totals = [0.0, 0.0, 0.0]
    for batch in batches:
        chosen, rejected = dpo_rewards(
            sequence_log_probs(model, batch)[0], sequence_log_probs(reference, batch)[0], beta
        )
        margins = chosen - rejected
        totals[0] += float((margins > 0).sum())
        totals[1] += float(margins.sum())
        totals[2] += margins.numel()
    return totals


def preference_from_sums(wins: float, margin_sum: float, pairs: float) -> dict:
    if not pairs:
        raise ValueError("no preference pairs to evaluate")
    return {"reward_accuracy": wins / pairs, "reward_margin": margin_sum / pairs}


def preference_accuracy(model, reference, batches: Iterable[dict], beta: float) -> dict:
    """Implicit DPO reward on held-out pairs: how often chosen beats rejected, and by how much."""
    return preference_from_sums(*preference_sums(model, reference, batches, beta))
