"""Does the best learning rate transfer across width (standard against μP), or across depth (μP
against μP with CompleteP)?

An lr sweep at each width (same depth, heads and data; the bundled sample, seq 128, every run the same
token budget, cosine schedule), under ``model.parametrization: standard`` and ``mup`` (base width: the
smallest), each run scored by its held-out loss at the end (256 blocks of 128 tokens). Printed: the
loss per width and lr, the best lr per width, and the **transfer regret** at each width: the loss at the
base width's best lr minus the width's own best loss (relative to it). Goal: μP regret <= 1% at 8x the
base width, with standard's beside it.

``--depths``: the same over depths at one width (``--width``, μP's base width there), under μP alone
(``mup``) and μP with ``model.depth_transfer: completep`` (base depth: the shallowest); the regret is
then the base depth's best lr's at each depth.

    python benchmarks/lr_transfer.py --out /tmp/lr_transfer.json          # ~40 minutes on 2 CPU cores
    python benchmarks/lr_transfer.py --widths 64 128 --lrs 3e-3 1e-2 --tokens 32768   # a quick look
    python benchmarks/lr_transfer.py --depths 2 4 8 --out /tmp/lr_transfer_depth.json  # depth transfer
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


def run_config(size: int, lr: float, parametrization: str, args) -> dict:
    """One run: ``size`` is the width, or under ``--depths`` the depth; ``parametrization`` is
    ``standard``, ``mup`` or ``completep`` (μP with CompleteP's depth transfer)."""
    width, layers = (args.width, size) if args.depths else (size, args.layers)
    model = {"preset": "custom", "hidden_size": width, "num_layers": layers, "num_heads": args.heads,
             "num_kv_heads": args.heads // 2, "max_seq_len": args.seq_len,
             "parametrization": "standard" if parametrization == "standard" else "mup"}  # fmt: skip
    if parametrization != "standard":
        model["mup_base_width"] = args.width if args.depths else args.widths[0]
    if parametrization == "completep":
        model |= {"depth_transfer": "completep", "depth_base_layers": args.depths[0]}
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
    parser.add_argument("--depths", type=int, nargs="+", help="sweep depths, not widths; the first is the base")
    parser.add_argument("--width", type=int, default=128, help="under --depths: every model's width")
    parser.add_argument("--parametrizations", nargs="+", choices=["standard", "mup", "completep"],
                        help="default: standard and mup over widths, mup and completep over depths")  # fmt: skip
    parser.add_argument("--layers", type=int, default=2, help="every model's depth when sweeping widths")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=131_072, help="every run's budget in trained tokens")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--val-examples", type=int, default=256)
    parser.add_argument("--out", type=Path, help="write the measurements here as JSON")
    args = parser.parse_args()
    if args.depths and "standard" in (args.parametrizations or []):
        parser.error("--depths compares mup and completep (CompleteP extends μP)")
    if not args.depths and "completep" in (args.parametrizations or []):
        parser.error("completep is a depth transfer: sweep --depths")
    args.parametrizations = args.parametrizations or (["mup", "completep"] if args.depths else ["standard", "mup"])
    axis, sizes = ("depth", args.depths) if args.depths else ("width", args.widths)

    started = time.perf_counter()
    losses: dict[str, dict[int, dict[float, float]]] = {}
    for parametrization in args.parametrizations:
        losses[parametrization] = {}
        for size in sizes:
            losses[parametrization][size] = {}
            for lr in args.lrs:
                result = Trainer(build_config(run_config(size, lr, parametrization, args))).fit()
                loss = result.final_eval["val_loss"]
                losses[parametrization][size][lr] = loss
                print(f"[{time.perf_counter() - started:6.0f}s] {parametrization:9s} {axis} {size:4d} lr {lr:<8g} "
                      f"val loss {loss:.4f}", flush=True)  # fmt: skip

    summary: dict[str, dict[int, dict]] = {}
    shape = f"width {args.width}" if args.depths else f"{args.layers} layers"
    print(f"\n{args.tokens:,} tokens per run, {shape}, {args.heads} heads; held-out loss (best per {axis} *)")
    for parametrization, by_size in losses.items():
        base_best = min(by_size[sizes[0]], key=by_size[sizes[0]].get)
        summary[parametrization] = {}
        print(f"\n{parametrization}: " + "".join(f"{f'lr {lr:g}':>12s}" for lr in args.lrs) + "   best lr   regret")
        for size, by_lr in by_size.items():
            best = min(by_lr, key=by_lr.get)
            regret = by_lr[base_best] - by_lr[best]
            relative = regret / by_lr[best]
            summary[parametrization][size] = {"best_lr": best, "regret": regret, "regret_relative": relative}
            cells = "".join(f"{by_lr[lr]:>11.4f}{'*' if lr == best else ' '}" for lr in args.lrs)
            print(f"  {axis} {size:4d} {cells} {best:>9g} {regret:>+8.4f} ({relative:+.2%})")
    largest = sizes[-1]
    goal = "completep" if args.depths else "μP"
    print(f"\ntransfer regret at {largest / sizes[0]:g}x {axis} (the base {axis}'s best lr, at {axis} {largest}): "
          + ", ".join(f"{p} {s[largest]['regret_relative']:+.2%}" for p, s in summary.items())
          + f"; goal {goal} <= 1%; {time.perf_counter() - started:.0f} s")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "losses": losses,
                                        "summary": summary}, indent=1, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
