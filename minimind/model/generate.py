"""Autoregressive sampling with a key/value cache.

:func:`stream` yields token ids one at a time (for a streaming chat); :func:`generate` collects
them. :class:`BatchDecoder` decodes several prompts at once, each with its own sampling settings
(a server's concurrent requests). ``temperature=0`` is greedy decoding. Generation stops at
``eos_id`` (``<|im_end|>``), at ``max_new_tokens`` or at the model's context length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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
    """One prompt's tokens as they are sampled: a :class:`BatchDecoder` of one row."""
    sampling = Sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, generator)
    decoder = BatchDecoder(model, [prompt_ids], [sampling], eos_id)
    while not decoder.done:
        [token] = decoder.step()
        yield token


@dataclass
class Sampling:
    """How one sequence is sampled (``stream``'s keyword arguments)."""

    max_new_tokens: int = 256
    temperature: float = 0.85
    top_p: float = 0.85
    top_k: int = 50
    repetition_penalty: float = 1.0
    generator: torch.Generator | None = None


def _sample(logits: torch.Tensor, seen: torch.Tensor, sampling: Sampling) -> int:
    """The next token from one row's last logits (float32); ``seen`` marks the tokens of the sequence so far."""
    if sampling.repetition_penalty != 1.0:
        # CTRL-style: make already-seen tokens less likely whatever the sign of their logit.
        penalty = sampling.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    if sampling.temperature <= 0:
        return int(logits.argmax())
    logits = _filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=sampling.generator))


def context_groups(prompt_lengths: Sequence[int], budgets: Sequence[int], limit: int) -> list[list[int]]:
    """Rows split into batches that each fit the context: a batch's rows share it, so each row can grow only to
    ``limit`` less the batch's longest prompt. Rows that fit together (longest prompt + largest budget <= limit)
    share a batch, shortest prompts first; a row is never cut below its own budget by another's prompt."""
    groups: list[list[int]] = []
    width = most = 0
    for row in sorted(range(len(prompt_lengths)), key=lambda r: prompt_lengths[r]):
        longer, larger = max(width, prompt_lengths[row]), max(most, budgets[row])
        if groups and longer + larger <= limit:
            groups[-1].append(row)
            width, most = longer, larger
        else:
            groups.append([row])
            width, most = prompt_lengths[row], budgets[row]
    return groups


class BatchDecoder:
    """Several prompts decoded together, one forward pass per step for all of them.

    Prompts are padded on the left to one length and the padding is masked (``MiniMindLM.forward``'s
    ``key_mask``), so each row samples as it would alone, up to float rounding. Each :meth:`step`
    returns every row's next token, or None for a row that has finished (its ``eos_id``, its
    ``max_new_tokens``, the context, or :meth:`finish`). Rows share the context: a row can grow to
    ``max_seq_len`` less the longest prompt.
    """

    def __init__(self, model: MiniMindLM, prompts: Sequence[Sequence[int]], samplings: Sequence[Sampling],
                 eos_id: int | None = 2):  # fmt: skip
        if not prompts or len(prompts) != len(samplings):
            raise ValueError("a prompt and a sampling setting for each row")
        self.model, self.samplings, self.eos_id = model.eval(), list(samplings), eos_id
        device = model.lm_head.weight.device
        limit = model.config.max_seq_len
        prompts = [list(prompt)[-(limit - 1) :] for prompt in prompts]
        if not all(prompts):
            raise ValueError("every prompt needs at least one token")
        width = max(len(prompt) for prompt in prompts)
        self.inputs = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
        self.key_mask = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
        self.seen = torch.zeros(len(prompts), model.config.vocab_size, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            self.inputs[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
            self.key_mask[row, width - len(prompt) :] = True
            self.seen[row, torch.tensor(prompt, device=device)] = True
        self.left = [max(0, min(s.max_new_tokens, limit - width)) for s in self.samplings]
        self.live = [left > 0 for left in self.left]
        self.cache = None

    @property
    def done(self) -> bool:
        return not any(self.live)

    def finish(self, row: int) -> None:
        """Stop decoding ``row`` (e.g. a stop string appeared in its text)."""
        self.live[row] = False

    @torch.inference_mode()
    def step(self) -> list[int | None]:
        if self.done:
            return [None] * len(self.live)
        # Without padding (one row, or prompts of one length, none finished) no mask is needed: the plain causal
        # path, as one sequence alone runs.
        key_mask = None if bool(self.key_mask.all()) else self.key_mask
        logits, _, self.cache = self.model(self.inputs, cache=self.cache, key_mask=key_mask)
        logits = logits[:, -1].float()
        tokens: list[int | None] = []
        for row, sampling in enumerate(self.samplings):
            if not self.live[row]:
                tokens.append(None)
                continue
            token = _sample(logits[row], self.seen[row], sampling)
            self.seen[row, token] = True
            self.left[row] -= 1
            self.live[row] = token != self.eos_id and self.left[row] > 0
            tokens.append(token)
        # The next step's input: each row's token (a finished row's is padding, masked from then on).
        fed = [token if token is not None else 0 for token in tokens]
        self.inputs = torch.tensor(fed, device=self.inputs.device)[:, None]
        real = torch.tensor([token is not None for token in tokens], device=self.inputs.device)[:, None]
        self.key_mask = torch.cat([self.key_mask, real], dim=1)
        return tokens


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
