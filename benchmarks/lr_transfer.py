"""Does the best learning rate transfer across width? Standard parametrization against μP.

An lr sweep at each width (same depth, heads and data; the bundled sample, seq 128, every run the same
token budget, cosine schedule), under ``model.parametrization: standard`` and ``mup`` (base width: the
smallest), each run scored by its held-out loss at the end (256 blocks of 128 tokens). Printed: the
loss per width and lr, the best lr per width, and the **transfer regret** at each width: the loss at the
base width's best lr minus the width's own best loss (relative to it). Goal: μP regret <= 1% at 8x the
base width, with standard's beside it.

    python benchmarks/lr_transfer.py --out /tmp/lr_transfer.json          # ~40 minutes on 2 CPU cores
    python benchmarks/lr_transfer.py --widths 64 128 --lrs 3e-3 1e-2 --tokens 32768   # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minimind.config import build_config  # noqa: E402
from minimind.train.loop import Trainer  # noqa: E402


def run_config(width: int, lr: float, parametrization: str, args) -> dict:
    model = {"preset": "custom", "hidden_size": width, "num_layers": args.layers, "num_heads": args.heads,
             "num_kv_heads": args.heads // 2, "max_seq_len": args.seq_len,
             "parametrization": parametrization}  # fmt: skip
    if parametrization == "mup":
        model["mup_base_width"] = args.widths[0]
    steps = max(1, args.tokens // (args.batch * args.seq_len))
    return {
        "model": model,
        "data": {"train_files": [str(ROOT / "data" / "sample" / "pretrain.jsonl")], "seq_len": args.seq_len},
        "optim": {"lr": lr, "batch_size": args.batch, "max_steps": steps, "warmup_steps": args.warmup},
        "eval": {"val_fraction": 0.1, "max_examples": args.val_examples, "continuation_docs": 0},
        "logging": {"every_steps": max(1, steps // 2)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512], help="the first is the base")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2])
    parser.add_argument("--parametrizations", nargs="+", default=["standard", "mup"], choices=["standard", "mup"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=131_072, help="every run's budget in trained tokens")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--val-examples", type=int, default=256)
    parser.add_argument("--out", type=Path, help="write the measurements here as JSON")
    args = parser.parse_args()

    started = time.perf_counter()
    losses: dict[str, dict[int, dict[float, float]]] = {}
    for parametrization in args.parametrizations:
        losses[parametrization] = {}
        for width in args.widths:
            losses[parametrization][width] = {}
            for lr in args.lrs:
                result = Trainer(build_config(run_config(width, lr, parametrization, args))).fit()
                loss = result.final_eval["val_loss"]
                losses[parametrization][width][lr] = loss
                print(f"[{time.perf_counter() - started:6.0f}s] {parametrization:8s} width {width:4d} lr {lr:<8g} "
                      f"val loss {loss:.4f}", flush=True)  # fmt: skip

    summary: dict[str, dict[int, dict]] = {}
    shape = f"{args.layers} layers, {args.heads} heads"
    print(f"\n{args.tokens:,} tokens per run, {shape}; held-out loss (best per width *)")
    for parametrization, by_width in losses.items():
        base_best = min(by_width[args.widths[0]], key=by_width[args.widths[0]].get)
        summary[parametrization] = {}
        print(f"\n{parametrization}: " + "".join(f"{f'lr {lr:g}':>12s}" for lr in args.lrs) + "   best lr   regret")
        for width, by_lr in by_width.items():
            best = min(by_lr, key=by_lr.get)
            regret = by_lr[base_best] - by_lr[best]
            relative = regret / by_lr[best]
            summary[parametrization][width] = {"best_lr": best, "regret": regret, "regret_relative": relative}
            cells = "".join(f"{by_lr[lr]:>11.4f}{'*' if lr == best else ' '}" for lr in args.lrs)
            print(f"  width {width:4d} {cells} {best:>9g} {regret:>+8.4f} ({relative:+.2%})")
    widest = args.widths[-1]
    print(f"\ntransfer regret at {widest // args.widths[0]}x width (the base width's best lr, at width {widest}): "
          + ", ".join(f"{p} {s[widest]['regret_relative']:+.2%}" for p, s in summary.items())
          + f"; goal μP <= 1%; {time.perf_counter() - started:.0f} s")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "losses": losses,
                                        "summary": summary}, indent=1, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
