"""``minimind chat``: a streaming terminal chat with a checkpoint or a Hugging Face export.

Keeps the multi-turn history (trimmed from the oldest turn when it no longer fits the context),
applies an optional LoRA adapter and system prompt. ``/reset`` clears the history, ``/exit`` or
end of input quits.
"""

from __future__ import annotations

import sys

import torch

from minimind.devices import select_device
from minimind.model.generate import stream_text
from minimind.model.hf import checkpoint_tokenizer, load_for_inference
from minimind.tokenizer import load_tokenizer


def prompt_ids(tokenizer, system: str | None, history: list[dict], budget: int) -> list[int]:
    """Rendered conversation ending in the generation prompt; drops the oldest turns to fit ``budget``."""
    turns = list(history)
    while True:
        messages = ([{"role": "system", "content": system}] if system else []) + turns
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        if len(ids) <= budget or len(turns) <= 1:
            return ids[-budget:]
        turns = turns[2:] if len(turns) > 2 else turns[1:]


def run_chat(args, sampling: dict) -> None:
    tokenizer = load_tokenizer(checkpoint_tokenizer(args.checkpoint, args.tokenizer))
    device = select_device(args.device)  # auto: a GPU when present; a GPU asked for and missing is refused
    model = load_for_inference(args.checkpoint, device, args.adapter)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    budget = model.config.max_seq_len - sampling["max_new_tokens"]
    history: list[dict] = []
    print("MiniMind chat. /reset clears the history, /exit quits.", flush=True)
    while True:
        try:
            line = input("user> ")
        except EOFError:
            print(flush=True)
            return
        text = line.strip()
        if text == "/exit":
            return
        if text == "/reset":
            history.clear()
            print("(history cleared)", flush=True)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        pieces = []
        for piece in stream_text(
            model,
            prompt_ids(tokenizer, args.system, history, budget),
            tokenizer.decode,
            tokenizer.eos_id,
            generator=generator,
            **sampling,
        ):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        reply = "".join(pieces)
        history.append({"role": "assistant", "content": reply})
