"""What the search buys: grid, random, TPE, ASHA + random, ASHA + TPE and ASHA + TPE + WSD cooldowns,
all over one discrete grid, over several seeds.

The grid: learning rate {2e-3, 3.5e-3, 6e-3, 1e-2, 1.7e-2, 3e-2} x batch size {8, 16, 32} (18 points;
the recipe's lr 1e-2 and batch 16 among them), tiny preset on the bundled sample, seq 128, every
trial the same budget of tokens (``--max-tokens``, default 1.57M: about two epochs of the sample, to
held-out perplexity ~300), judged by held-out perplexity over 256 blocks (32,512 target tokens).

- ``grid``: every point trained to the whole budget (``ray_jobs/tune.py --sampler grid
  --no-early-stopping``): the reference, run once (training does not depend on the sampler's seed).
- ``random``, ``tpe``: ``--num-samples`` trials (default 9: half the grid) trained to the whole budget,
  drawn by the sweep's own searcher (``DistinctOptunaSearch`` with ``optuna_sampler``: the recipe's
  values first, then Optuna's random sampler or TPE). Each trial is *looked up* in the grid's results
  instead of being trained again: a trial's run depends only on its config (the recipe's seed, one
  worker), so the lookup is the run it would have been; the draws are those of a sweep run one trial
  at a time (``--max-concurrent 1``; with trials in parallel TPE also sees the running ones).
- ``asha+random``, ``asha+tpe``: real sweeps (``ray_jobs/tune.py``) of as many trials, ASHA stopping
  the worst at rungs ``--max-tokens / 16`` and ``/ 4`` (reduction factor 4), evaluated only there and
  at the end.
- ``asha+tpe+wsd``: the same under warmup-stable-decay (decay over the last 20%), ASHA judging
  cooldown evaluations at the rungs (``eval.cooldown_fraction`` 0.25; the branches' tokens count).

Per arm and seed it prints the best perplexity of a trial trained to the whole budget and the tokens
trained over all trials, as ratios to the grid's; then per arm the mean +- sd over seeds and the
share of seeds within 1% of the grid's best. Goal: the best arm within 1% on >= 80% of seeds for
<= 20% of the grid's tokens. Sweeps already measured in ``--work`` are read back, not run again.

    python benchmarks/tune_efficiency.py --work /tmp/tune-efficiency              # ~75 minutes on 2 CPU cores
    python benchmarks/tune_efficiency.py --work /tmp/te --max-tokens 262144 --seeds 0 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minimind.tune.launch import plan_from_settings  # noqa: E402
from minimind.tune.report import best_trial  # noqa: E402
from minimind.tune.results import collect_records  # noqa: E402
from minimind.tune.search import DistinctOptunaSearch, optuna_sampler  # noqa: E402
from minimind.tune.settings import SweepSettings, load_settings  # noqa: E402

SPACE = """\
stage: pretrain
recipe: {root}/recipes/tiny/pretrain.yaml
objective: val_perplexity
budget: {{max_tokens: {max_tokens}, grace_tokens: {rung}, reduction_factor: 4}}
overrides:
  data.train_files: [{root}/data/sample/pretrain.jsonl]
  data.seq_len: 128
  optim.warmup_steps: 10
  optim.epochs: 3
  eval.val_fraction: 0.1
  eval.max_examples: 256
  eval.continuation_docs: 0
  logging.every_steps: 50
  checkpoint.every_steps: 100000
{schedule}params:
  optim.lr: {{choice: [2.0e-3, 3.5e-3, 6.0e-3, 1.0e-2, 1.7e-2, 3.0e-2]}}
  optim.batch_size: {{choice: [8, 16, 32]}}
"""
WSD = "  optim.schedule: wsd\n  eval.cooldown_fraction: 0.25\n"

REAL_ARMS = {  # name: (space, tune.py flags)
    "asha+random": ("cosine", ["--sampler", "random"]),
    "asha+tpe": ("cosine", ["--sampler", "tpe"]),
    "asha+tpe+wsd": ("wsd", ["--sampler", "tpe"]),
}
LOOKED_UP_ARMS = ("random", "tpe")
ARMS = (*LOOKED_UP_ARMS, *REAL_ARMS)


def point(params: dict) -> tuple[float, int]:
    """(lr, batch) of a trial's parameters, however the searcher nests their names."""
    flat = json.dumps(params, sort_keys=True)
    found = json.loads(flat)
    while isinstance(found.get("optim"), dict):  # Ray's searchers may unflatten "optim.lr" into {"optim": {"lr"}}
        found = {f"optim.{key}": value for key, value in found.pop("optim").items()} | found
    return float(found["optim.lr"]), int(found["optim.batch_size"])


def run_sweep(name: str, flags: list[str], space: Path, work: Path, seed: int) -> dict:
    """A real sweep via ray_jobs/tune.py (read back if ``work`` holds it already)."""
    done_file = work / f"{name}.json"
    if done_file.exists():
        return json.loads(done_file.read_text())
    command = [sys.executable, str(ROOT / "ray_jobs/tune.py"), "--space", str(space), "--name", name,
               "--storage-path", str(work), "--seed", str(seed), *flags]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    settings = load_settings(str(work / name))
    records = collect_records(plan_from_settings(settings))
    finished = [record for record in records if record.status == "finished"]
    best = best_trial(finished, "min")
    result = {
        "trials": [
            {"point": point(r.params), "status": r.status, "objective": r.objective, "tokens": r.tokens}
            for r in records
        ],
        "best": best.objective if best else math.nan,
        "best_point": point(best.params) if best else None,
        "tokens": sum(record.tokens for record in records),
        "pruned": sum(record.status == "pruned" for record in records),
        "wall": time.perf_counter() - started,
    }
    done_file.write_text(json.dumps(result, indent=1))
    return result


def look_up(sampler: str, space: Path, work: Path, seed: int, num_samples: int, table: dict) -> dict:
    """``num_samples`` trials drawn by the sweep's own searcher, each told its grid result."""
    settings = SweepSettings(f"lookup-{sampler}-{seed}", str(work), str(space), {}, "val_perplexity", num_samples,
                             seed=seed, sampler=sampler)  # fmt: skip
    plan = plan_from_settings(settings)
    searcher = DistinctOptunaSearch(
        space=plan.space,
        metric="objective",
        mode="min",
        points_to_evaluate=[plan.space.baseline(), *plan.space.points],
        sampler=optuna_sampler(settings, plan),
    )
    drawn = []
    for index in range(num_samples):
        trial_id = f"t{index}"
        found = point(searcher.suggest(trial_id))
        drawn.append(found)
        searcher.on_trial_complete(trial_id, {"objective": table[found]["objective"]})
    best = min(drawn, key=lambda p: table[p]["objective"])
    return {
        "trials": [{"point": p, **table[p]} for p in drawn],
        "best": table[best]["objective"],
        "best_point": best,
        "tokens": sum(table[p]["tokens"] for p in drawn),
        "pruned": 0,
        "wall": 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="sweeps and results (kept: a rerun reads them back)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--max-tokens", type=int, default=1_572_864, help="each trial's token budget")
    parser.add_argument("--num-samples", type=int, default=9, help="trials of every arm but the grid")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="arms besides the grid")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    spaces = {}
    for schedule, extra in (("cosine", ""), ("wsd", WSD)):
        spaces[schedule] = args.work / f"{schedule}.yaml"
        spaces[schedule].write_text(
            SPACE.format(root=ROOT, max_tokens=args.max_tokens, rung=args.max_tokens // 16, schedule=extra)
        )
    started = time.perf_counter()
    grid = run_sweep("grid", ["--sampler", "grid", "--no-early-stopping"], spaces["cosine"], args.work, 0)
    table = {tuple(t["point"]): t for t in grid["trials"] if t["status"] == "finished"}
    print(f"[{time.perf_counter() - started:5.0f}s] grid: {len(table)} points, best ppl {grid['best']:.2f} at "
          f"{grid['best_point']}", flush=True)  # fmt: skip
    rows = []
    for seed in args.seeds:
        for arm in args.arms:
            if arm in LOOKED_UP_ARMS:
                row = look_up(arm, spaces["cosine"], args.work, seed, args.num_samples, table)
            else:
                schedule, flags = REAL_ARMS[arm]
                flags = [*flags, "--num-samples", str(args.num_samples)]
                row = run_sweep(f"{arm.replace('+', '-')}-seed{seed}", flags, spaces[schedule], args.work, seed)
            rows.append({"arm": arm, "seed": seed, **row})
            print(f"[{time.perf_counter() - started:5.0f}s] {arm:13s} seed {seed}: best {row['best']:.2f} "
                  f"({row['best'] / grid['best']:.3f}x grid) for {row['tokens'] / grid['tokens']:.1%} of its tokens",
                  flush=True)  # fmt: skip

    print(f"\n{len(table)}-point grid, {args.num_samples} trials per arm, {args.max_tokens:,} tokens per whole "
          f"trial; grid best val ppl {grid['best']:.2f} at lr {grid['best_point'][0]:g}, batch "
          f"{grid['best_point'][1]}, {grid['tokens']:,} tokens\n")  # fmt: skip
    print(
        f"{'arm':13s} {'seed':>4} {'pruned':>6} {'best ppl':>9} {'x grid':>7} {'tokens x grid':>13}  best (lr, batch)"
    )
    for row in rows:
        print(f"{row['arm']:13s} {row['seed']:>4} {row['pruned']:>6} {row['best']:>9.2f} "
              f"{row['best'] / grid['best']:>7.3f} {row['tokens'] / grid['tokens']:>13.3f}  "
              f"{row['best_point']}")  # fmt: skip
    print(f"\n{'arm':13s} {'best x grid (mean +- sd)':>25} {'within 1%':>10} {'tokens x grid':>14}")
    summary = {}
    for arm in args.arms:
        mine = [row for row in rows if row["arm"] == arm]
        ratios = [row["best"] / grid["best"] for row in mine]
        shares = [row["tokens"] / grid["tokens"] for row in mine]
        within = sum(ratio <= 1.01 for ratio in ratios) / len(mine)
        spread = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
        summary[arm] = {"ratio_mean": statistics.mean(ratios), "ratio_sd": spread, "within_1pct": within,
                        "tokens_mean": statistics.mean(shares)}  # fmt: skip
        print(f"{arm:13s} {statistics.mean(ratios):>16.4f} +- {spread:.4f} {within:>10.0%} "
              f"{statistics.mean(shares):>14.3f}")  # fmt: skip
    meets = [arm for arm, s in summary.items() if s["within_1pct"] >= 0.8 and s["tokens_mean"] <= 0.2]
    print(f"\ngoal (within 1% of the grid's best on >= 80% of seeds, <= 20% of its tokens): "
          f"{'met by ' + ', '.join(meets) if meets else 'not met'}; {time.perf_counter() - started:.0f} s")  # fmt: skip
    (args.work / "summary.json").write_text(json.dumps({"grid": grid, "rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
