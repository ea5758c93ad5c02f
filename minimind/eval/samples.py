"""Qualitative samples: MiniMind's continuation prompts and a few chat prompts."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from minimind.model.generate import stream_text

CONTINUATION_PROMPTS = (
    "马克思主义基本原理",
    "人类大脑的主要功能",
    "万有引力原理是",
    "世界上最高的山峰是",
    "二氧化碳在空气中",
    "地球上最大的动物有",
    "杭州市的美食有",
)
CHAT_PROMPTS = ("你好，请介绍一下你自己。", "What is the capital of France?", "请用一句话解释什么是机器学习。")


def generate_samples(
    model, tokenizer, prompts: Sequence[str], chat: bool, seed: int = 0, on_text=None, **sampling
) -> list[dict]:
    """Generate one reply per prompt (seeded); ``on_text(prompt_index, piece)`` streams the text,
    called first with an empty piece when a prompt starts."""
    device = model.lm_head.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = []
    for index, prompt in enumerate(prompts):
        text = (
            tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            if chat
            else prompt
        )
        if on_text:
            on_text(index, "")
        pieces = []
        for piece in stream_text(
            model, tokenizer.encode(text), tokenizer.decode, tokenizer.eos_id, generator=generator, **sampling
        ):
            pieces.append(piece)
            if on_text:
                on_text(index, piece)
        samples.append({"prompt": prompt, "output": "".join(pieces), "chat": chat})
    return samples
