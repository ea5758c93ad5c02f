"""Rank fidelity: do early readings rank trials as their ends do? Cosine vs WSD with and without cooldowns.

Eight trials (learning rate x batch size, equal token budgets, tiny preset on the bundled sample), each
trained to the end twice, in process (no early stopping: every trial's final value is known):

- ``cosine``: MiniMind's schedule, evaluated at the rungs: (a) mid-cosine readings;
- ``wsd``: warmup-stable-decay with ``eval.cooldown_fraction``, evaluated at the same rungs:
  (b) the cooldown branches' values (``val_*``) and (c) the stable model's (``val_*_stable``).

For each rung it prints Spearman's rho between the rung's values and the final values of the same
schedule, and the regret of stopping there: how much worse the final value of the rung's best trial is
than the best final value. Target: (b) rho >= 0.9 at the rung at 25% of the budget, where (a) is lower.

    python benchmarks/rank_fidelity.py                       # ~10 minutes on 2 CPU cores
    python benchmarks/rank_fidelity.py --tokens 131072 --lrs 3e-3 1e-2 --batches 8 16   # quicker
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minimind.config import build_config  # noqa: E402
from minimind.train.loop import Trainer  # noqa: E402
from minimind.tune.fidelity import spearman  # noqa: E402

RUNG_FRACTIONS = (1 / 9, 1 / 4, 1 / 2)


def trial_config(lr: float, batch: int, args, schedule: str, rung_steps: list[int], steps: int) -> dict:
    optim = {"lr": lr, "batch_size": batch, "max_steps": steps, "warmup_steps": args.warmup, "schedule": schedule}
    evaluation = {
        "val_fraction": 0.1,
        "max_examples": args.val_examples,
        "continuation_docs": 0,
        "at_steps": rung_steps,
        "cooldown_fraction": args.cooldown if schedule == "wsd" else 0.0,
    }
    return {
        "model": {"preset": args.preset},
        "data": {"train_files": [str(ROOT / "data" / "sample" / "pretrain.jsonl")], "seq_len": args.seq_len},
        "optim": optim,
        "eval": evaluation,
        "logging": {"every_steps": max(1, steps // 4)},
    }


def run(raw: dict) -> dict[int, dict]:
    """The run's evaluation rows by step."""
    result = Trainer(build_config(raw)).fit()
    return {row["step"]: row for row in result.history if "val_loss" in row}


def fidelity(early: dict[str, float], final: dict[str, float]) -> tuple[float | None, float]:
    """(rho, regret): regret is the relative excess of the final loss of the rung's best over the best final."""
    names = sorted(final)
    rho = spearman([early[n] for n in names], [final[n] for n in names])
    pick = min(names, key=lambda n: early[n])
    return rho, final[pick] / min(final.values()) - 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--tokens", type=int, default=262_144, help="every trial's budget in trained tokens")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-3, 5e-3, 1.2e-2, 3e-2])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--cooldown", type=float, default=0.25, help="eval.cooldown_fraction of the WSD arm")
    parser.add_argument("--val-examples", type=int, default=256)
    parser.add_argument("--out", type=Path, help="write the measurements here as JSON")
    args = parser.parse_args()

    readings: dict[str, dict[str, dict]] = {"cosine": {}, "wsd": {}}
    started = time.perf_counter()
    for batch in args.batches:
        steps = max(1, args.tokens // (batch * args.seq_len))
        rung_steps = sorted({max(1, round(fraction * steps)) for fraction in RUNG_FRACTIONS})
        for lr in args.lrs:
            name = f"lr={lr:g},batch={batch}"
            for schedule in readings:
                rows = run(trial_config(lr, batch, args, schedule, rung_steps, steps))
                if steps not in rows:  # the run stops at the end of its one epoch
                    raise SystemExit(f"{name} ended at step {max(rows)} of {steps}: the corpus holds fewer training "
                                     "tokens than --tokens (one epoch); lower --tokens")  # fmt: skip
                by_rung = {
                    fraction: rows[max(1, round(fraction * steps))] for fraction in RUNG_FRACTIONS
                }  # rungs as fractions of the budget: the same for every batch size
                readings[schedule][name] = {"final": rows[steps]["val_loss"], "rungs": by_rung}
                final_ppl = math.exp(rows[steps]["val_loss"])
                print(f"[{time.perf_counter() - started:6.0f}s] {schedule:6s} {name:22s} final ppl {final_ppl:8.1f}",
                      flush=True)  # fmt: skip
    arms = {
        "(a) mid-cosine": ("cosine", "val_loss"),
        "(b) WSD cooldown": ("wsd", "val_loss"),
        "(c) mid-WSD, no cooldown": ("wsd", "val_loss_stable"),
    }
    table = {}
    print(f"\n{len(readings['cosine'])} trials, {args.tokens:,} tokens each; rho vs the same schedule's final values")
    print(f"{'judged by':28s}" + "".join(f" | {f'rung {f:.0%}':24s}" for f in RUNG_FRACTIONS))
    for label, (schedule, key) in arms.items():
        final = {name: trial["final"] for name, trial in readings[schedule].items()}
        cells, table[label] = [], {}
        for fraction in RUNG_FRACTIONS:
            early = {name: trial["rungs"][fraction][key] for name, trial in readings[schedule].items()}
            rho, regret = fidelity(early, final)
            table[label][f"{fraction:.3f}"] = {"rho": rho, "regret": regret}
            cells.append(f"rho {'n/a' if rho is None else f'{rho:+.2f}'}, regret {regret:5.1%}")
        print(f"{label:28s}" + "".join(f" | {cell:24s}" for cell in cells))
    best = {s: min(math.exp(t["final"]) for t in readings[s].values()) for s in readings}
    print(f"best final perplexity: cosine {best['cosine']:.1f}, wsd {best['wsd']:.1f}")
    quarter = table["(b) WSD cooldown"][f"{1 / 4:.3f}"]["rho"]
    cosine_quarter = table["(a) mid-cosine"][f"{1 / 4:.3f}"]["rho"]
    met = quarter is not None and quarter >= 0.9 and (cosine_quarter is None or cosine_quarter < quarter)
    print(f"target (b) rho >= 0.9 at 25% and above (a): {'met' if met else 'not met'}; "
          f"{time.perf_counter() - started:.0f} s in all")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "table": table,
                                        "readings": readings}, indent=1, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
