"""Training-loop throughput: eager vs torch.compile, packed vs padded pretrain batches.

Runs the real training step (forward, backward, AdamW) of one preset on the bundled pretrain
sample, on whatever device is present, and prints real (non-padding) tokens/s side by side with
ratios. "padded" is MiniMind's layout: one document per row, padded to the batch's longest row.

    python benchmarks/train_throughput.py                        # minimind-26m, seq 512
    python benchmarks/train_throughput.py --steps 30 --batch-size 32 --device cuda
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from minimind.config import build_config
from minimind.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]


def measure(
    preset: str, seq_len: int, batch_size: int, packing: bool, compile_model: bool, device: str, warmup: int, steps: int
) -> dict:
    config = build_config(
        {
            "model": {"preset": preset},
            "data": {"train_files": [str(ROOT / "data/sample/pretrain.jsonl")], "seq_len": seq_len, "packing": packing},
            "optim": {"batch_size": batch_size, "max_steps": warmup + steps},
            "runtime": {"device": device, "compile": compile_model},
        }
    )
    trainer = Trainer(config)
    for step in range(warmup):  # compilation and allocator warm-up are not measured
        trainer.train_step(step)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    real = padded = 0
    start = time.perf_counter()
    for step in range(warmup, warmup + steps):
        out = trainer.train_step(step)
        real += float(out["real_tokens"])
        padded += float(out["total_tokens"])
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "tokens_per_second": real / seconds,
        "padding_fraction": 1 - real / padded,
        "seconds": seconds,
        "device": str(trainer.device),
        "dtype": str(trainer.dtype).replace("torch.", ""),
    }
    if trainer.peak_flops:
        result["mfu"] = real / seconds * trainer.flops_per_token / trainer.peak_flops
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="minimind-26m")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = parser.parse_args()

    rows = {}
    for compile_model in (False,) if args.no_compile else (False, True):
        for packing in (True, False):
            name = f"{'compile' if compile_model else 'eager'}/{'packed' if packing else 'padded'}"
            rows[name] = measure(
                args.preset, args.seq_len, args.batch_size, packing, compile_model, args.device, args.warmup, args.steps
            )
            print(f"measured {name}: {rows[name]['tokens_per_second']:.0f} tok/s", flush=True)
    base = rows["eager/padded"]["tokens_per_second"]
    first = next(iter(rows.values()))
    print(
        f"\n{args.preset}, seq {args.seq_len}, batch {args.batch_size}, {first['device']} {first['dtype']}, "
        f"{args.steps} timed steps after {args.warmup} warm-up"
    )
    print(f"{'variant':<16}{'tokens/s':>12}{'padding':>10}{'vs eager/padded':>18}{'MFU':>8}")
    for name, row in rows.items():
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else "-"
        print(
            f"{name:<16}{row['tokens_per_second']:>12.0f}{row['padding_fraction']:>10.1%}"
            f"{row['tokens_per_second'] / base:>17.2f}x{mfu:>8}"
        )
    speed = {name: row["tokens_per_second"] for name, row in rows.items()}
    if "compile/packed" in speed:
        print(f"compile vs eager (packed): {speed['compile/packed'] / speed['eager/packed']:.2f}x")
    print(f"packed vs padded (eager):  {speed['eager/packed'] / base:.2f}x")


if __name__ == "__main__":
    main()
