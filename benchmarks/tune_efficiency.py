"""What the search buys: ASHA + TPE against random search and a full grid, at an equal trial budget.

Three sweeps over the same ranges (tiny preset on the bundled sample; learning rate in
[3e-3, 2e-2] x batch size in {4, 8, 16}), each run the way users run them (``ray_jobs/tune.py``, a
local Ray):

- ``grid``: 4 learning rates spread over the range x 3 batch sizes = 12 points, each trained to the
  whole token budget (no early stopping);
- ``random``: as many trials as the grid has points, the learning rate drawn log-uniformly, each
  trained to the whole budget;
- ``asha+tpe``: as many trials, sampled by TPE over the same log-uniform range, with ASHA stopping
  the worst at its token rungs.

Printed side by side: the best validation perplexity found (of a trial trained to the whole budget)
and the tokens trained over all trials, with ratios to the grid's. Target: ASHA + TPE within 2% of
the grid's best for at most 25% of its tokens.

    python benchmarks/tune_efficiency.py                    # ~10 minutes on 2 CPU cores
    python benchmarks/tune_efficiency.py --seeds 0 1 2      # random and TPE draws repeated
    python benchmarks/tune_efficiency.py --seeds 0 1 2 --arms asha+tpe   # the grid (the reference) and ASHA + TPE
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minimind.tune.launch import plan_from_settings  # noqa: E402
from minimind.tune.report import best_trial  # noqa: E402
from minimind.tune.results import collect_records  # noqa: E402
from minimind.tune.settings import load_settings  # noqa: E402

SPACE = """\
stage: pretrain
recipe: {root}/recipes/tiny/pretrain.yaml
objective: val_perplexity
budget: {{max_tokens: {max_tokens}, eval_every_tokens: {rung}, grace_tokens: {rung}, reduction_factor: {factor}}}
overrides:
  data.train_files: [{root}/data/sample/pretrain.jsonl]
  data.seq_len: 64
  optim.warmup_steps: 4
  eval.val_fraction: 0.1
  eval.max_examples: 32
  eval.continuation_docs: 0
  logging.every_steps: 8
params:
  optim.lr: {lr}
  optim.batch_size: {{choice: [4, 8, 16]}}
"""
GRID_LR = "{choice: [3.0e-3, 6.0e-3, 1.0e-2, 2.0e-2]}"
SAMPLED_LR = "{loguniform: [3.0e-3, 2.0e-2]}"
GRID_POINTS = 12

ARMS = {
    "grid": ["--sampler", "grid", "--no-early-stopping"],
    "random": ["--sampler", "random", "--no-early-stopping", "--num-samples", str(GRID_POINTS)],
    "asha+tpe": ["--sampler", "tpe", "--num-samples", str(GRID_POINTS)],
}


def run_arm(name: str, flags: list[str], space: Path, storage: Path, seed: int) -> dict:
    sweep = f"{name.replace('+', '-')}-seed{seed}"
    command = [sys.executable, str(ROOT / "ray_jobs/tune.py"), "--space", str(space), "--name", sweep,
               "--storage-path", str(storage), "--seed", str(seed), *flags]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    settings = load_settings(str(storage / sweep))
    plan = plan_from_settings(settings)
    records = collect_records(plan)
    finished = [record for record in records if record.status == "finished"]
    best = best_trial(finished, plan.objective.mode)
    return {
        "arm": name,
        "seed": seed,
        "trials": len(records),
        "pruned": sum(record.status == "pruned" for record in records),
        "best": best.objective if best else float("nan"),
        "best_params": best.params if best else {},
        "tokens": sum(record.tokens for record in records),
        "wall": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the random and TPE arms")
    parser.add_argument("--max-tokens", type=int, default=16384, help="each trial's token budget")
    parser.add_argument("--rung-tokens", type=int, default=1024, help="ASHA's first rung (and evaluation interval)")
    parser.add_argument("--reduction-factor", type=int, default=4, help="ASHA's: 1/factor of a rung's trials go on")
    parser.add_argument(
        "--arms", nargs="+", choices=("random", "asha+tpe"), default=["random", "asha+tpe"],
        help="arms besides the grid, which always runs: the ratios are to it",
    )  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tune-efficiency-") as tmp:
        storage = Path(tmp)
        spaces = {}
        for name, lr in (("grid", GRID_LR), ("sampled", SAMPLED_LR)):
            spaces[name] = storage / f"{name}.yaml"
            spaces[name].write_text(
                SPACE.format(
                    root=ROOT, max_tokens=args.max_tokens, rung=args.rung_tokens, factor=args.reduction_factor, lr=lr
                )
            )
        rows = [run_arm("grid", ARMS["grid"], spaces["grid"], storage, 0)]  # the grid does not depend on the seed
        for seed in args.seeds:
            rows += [run_arm(name, ARMS[name], spaces["sampled"], storage, seed) for name in args.arms]
    grid = rows[0]
    asha = f"ASHA's first rung {args.rung_tokens:,} tokens, reduction factor {args.reduction_factor}"
    print(f"\ntiny preset, {GRID_POINTS} trials per arm, {args.max_tokens:,} tokens per whole trial; {asha}; "
          f"ratios to the grid\n")  # fmt: skip
    header = f"{'arm':10} {'seed':>4} {'trials':>6} {'pruned':>6} {'best val ppl':>12} {'x grid':>7} "
    header += f"{'tokens':>9} {'x grid':>7} {'wall s':>7}  best params"
    print(header)
    for row in rows:
        params = {key: float(f"{value:.3g}") if isinstance(value, float) else value
                  for key, value in row["best_params"].items()}  # fmt: skip
        print(
            f"{row['arm']:10} {row['seed']:>4} {row['trials']:>6} {row['pruned']:>6} {row['best']:>12.2f} "
            f"{row['best'] / grid['best']:>7.3f} {row['tokens']:>9,} {row['tokens'] / grid['tokens']:>7.3f} "
            f"{row['wall']:>7.0f}  {params}"
        )
    for row in rows:
        if row["arm"] == "asha+tpe":
            within = row["best"] / grid["best"] - 1
            share = row["tokens"] / grid["tokens"]
            verdict = "meets" if within <= 0.02 and share <= 0.25 else "misses"
            print(f"\nasha+tpe seed {row['seed']}: best {within:+.1%} vs the grid's for {share:.0%} of its tokens "
                  f"({verdict} the target: within 2% for <= 25%)")  # fmt: skip


if __name__ == "__main__":
    main()
