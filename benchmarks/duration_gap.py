"""How far a cooldown branch at duration D is from a full warmup-stable-decay run of length D.

A duration sweep (``budget.durations_tokens``) trains each trial once, to the longest duration, and
scores every shorter duration D by a cooldown branch from the stable step t with t + round(f * t) = D
(``minimind/tune/plan.py:duration_evaluations``). When the branch's decay is the D-step run's (its last
round(decay_fraction * D) steps, the same batches), the two are the same computation; where rounding
makes the branch a step longer or shorter than that decay, or no stable step ends exactly at D, they
differ. This prints, per learning rate and duration, the branch's held-out loss, the full run's, and
the gap. Tiny preset on the bundled sample, in-process:

    python benchmarks/duration_gap.py                         # about 5 minutes on 2 CPU cores
    python benchmarks/duration_gap.py --steps 200 --durations 0.3 0.55 0.8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minimind.config import build_config, load_yaml  # noqa: E402
from minimind.train.compute import tokens_per_step  # noqa: E402
from minimind.train.loop import Trainer  # noqa: E402
from minimind.tune.plan import duration_evaluations, duration_steps  # noqa: E402


def run_config(lr: float, max_steps: int, extra: dict | None = None):
    raw = load_yaml(ROOT / "recipes/tiny/pretrain.yaml")
    overrides = {
        "data.train_files": [str(ROOT / "data/sample/pretrain.jsonl")],
        "optim.lr": lr,
        "optim.schedule": "wsd",
        "optim.warmup_steps": 10,
        "optim.max_steps": max_steps,
        "eval.val_fraction": 0.1,
        "eval.max_examples": 256,
        "eval.continuation_docs": 0,
        "eval.every_steps": 0,
        "logging.every_steps": 1000,
        "checkpoint.dir": None,
        **(extra or {}),
    }
    return build_config(raw, overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=240, help="the longest duration, in steps")
    parser.add_argument("--durations", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                        help="shorter durations, as fractions of the longest")  # fmt: skip
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2])
    args = parser.parse_args()
    started = time.perf_counter()
    rows = []
    for lr in args.lrs:
        longest = run_config(lr, args.steps)
        step_tokens = tokens_per_step(longest)
        durations = sorted({duration_steps(f * args.steps * step_tokens, step_tokens) for f in args.durations})
        branching = duration_evaluations(longest, [d * step_tokens for d in [*durations, args.steps]], step_tokens)
        long_run = Trainer(run_config(lr, args.steps, branching)).fit()
        branches = {row["step"]: row for row in long_run.history if row.get("cooldown_steps")}
        for duration, start in zip(durations, branching["eval.at_steps"]):
            branch = branches[start]
            full = Trainer(run_config(lr, duration)).fit().final_eval
            decay = round(longest.optim.decay_fraction * duration)
            rows.append((lr, duration, start, branch["cooldown_steps"], decay, branch["val_loss"], full["val_loss"]))
            print(f"[{time.perf_counter() - started:5.0f}s] lr {lr:g}, {duration} steps: branch from step {start} "
                  f"({branch['cooldown_steps']} steps) {branch['val_loss']:.5f}, full run {full['val_loss']:.5f}",
                  flush=True)  # fmt: skip
    print(f"\ntiny preset, seq {longest.data.seq_len}, batch {longest.optim.batch_size}, WSD (decay "
          f"{longest.optim.decay_fraction:g}, {longest.optim.decay_shape}), longest {args.steps} steps; held-out "
          f"loss over {longest.eval.max_examples} blocks\n")  # fmt: skip
    print("| lr | duration (steps) | branch from | branch steps | run's decay steps | branch val_loss "
          "| full run val_loss | gap |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for lr, duration, start, branch_steps, decay, cooled, full in rows:
        print(f"| {lr:g} | {duration} | {start} | {branch_steps} | {decay} | {cooled:.5f} | {full:.5f} "
              f"| {(cooled - full) / full:+.3%} |")  # fmt: skip
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
