"""Autoregressive sampling with a key/value cache.

:func:`stream` yields token ids one at a time (for a streaming chat); :func:`generate` collects
them. ``temperature=0`` is greedy decoding. Generation stops at ``eos_id`` (``<|im_end|>``), at
``max_new_tokens`` or at the model's context length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from minimind.model.minimind import MiniMindLM


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already cover top_p (the top token always stays).
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.inference_mode()
def stream(
    model: MiniMindLM,
    prompt_ids: Sequence[int],
    max_new_tokens: int = 256,
    temperature: float = 0.85,
    top_p: float = 0.85,
    top_k: int = 50,
    repetition_penalty: float = 1.0,
    eos_id: int | None = 2,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    model.eval()
    device = model.lm_head.weight.device
    limit = model.config.max_seq_len
    prompt = list(prompt_ids)[-(limit - 1) :]
    seen = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=device)
    seen[torch.tensor(prompt, device=device)] = True
    input_ids = torch.tensor([prompt], device=device)
    cache = None
    for _ in range(min(max_new_tokens, limit - len(prompt))):
        logits, _, cache = model(input_ids, cache=cache)
        logits = logits[0, -1].float()
        if repetition_penalty != 1.0:
            # CTRL-style: make already-seen tokens less likely whatever the sign of their logit.
            penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
            logits = torch.where(seen, penalised, logits)
        if temperature <= 0:
            token = int(logits.argmax())
        else:
            logits = _filter_logits(logits / temperature, top_k, top_p)
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        yield token
        if token == eos_id:
            return
        seen[token] = True
        input_ids = torch.tensor([[token]], device=device)


def generate(model: MiniMindLM, prompt_ids: Sequence[int], **kwargs) -> list[int]:
    """All generated ids (the stop token included when reached)."""
    return list(stream(model, prompt_ids, **kwargs))


def stream_text(model: MiniMindLM, prompt_ids: Sequence[int], decode, eos_id: int, **kwargs) -> Iterator[str]:
    """The reply as text pieces while it is generated, stopping before ``eos_id``.

    ``decode`` maps ids to text. A character whose bytes span several tokens is held back until it
    is complete, so the pieces join to exactly ``decode(reply_ids)``.
    """
    ids: list[int] = []
    shown = ""
    for token in stream(model, prompt_ids, eos_id=eos_id, **kwargs):
        if token == eos_id:
            break
        ids.append(token)
        stable = decode(ids).rstrip("\ufffd")
        if len(stable) > len(shown):
            yield stable[len(shown) :]
            shown = stable
    rest = decode(ids)[len(shown) :]
    if rest:
        yield rest
