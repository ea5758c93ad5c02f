"""What Ray Train costs: the same pretrain steps in-process, as a TorchTrainer with 1 worker, and with 2.

Each variant trains the same preset on the bundled sample for the same steps and global batch, and
checkpoints at the end. Printed side by side with ratios to in-process:

- wall seconds, launch to result;
- steady tokens/s: the mean of the logged windows after the first (warm-up and start-up excluded);
- start-up seconds: the wall time that steady training does not explain (process and worker-group
  start, data and model construction, the first window's warm-up, the final checkpoint).

Target: Ray with 1 worker within 5% of in-process past start-up. The 2-worker row splits the same
global batch over two DDP processes with one core each (gloo all-reduce), instead of one process
using both cores for its matmuls: on a 2-core machine that measures DDP's cost, not a speed-up.

Each Ray report (``ray.train.report``) is a barrier that waits for the Train controller's next poll;
log rows go to Ray at most every ``logging.ray_report_every_s``. The row "reports every log" sets it
to 0 (every log step reported, as before that setting): the per-report cost, which matters at fast
steps (``--preset tiny``: ~50 ms steps on 2 cores).

    python benchmarks/ray_overhead.py                          # minimind-26m, seq 256, 40 steps
    python benchmarks/ray_overhead.py --preset tiny --seq-len 256 --batch-size 16 --steps 600 --every 10

With ``RAY_ADDRESS`` set it runs on that cluster (give it the cores ``--cpus`` names and nothing else).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import ray
import torch

from minimind.config import build_config
from minimind.train import distributed
from minimind.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]


def make_config(args, run_dir: Path, workers: int, report_every_s: float | None = None):
    logging = {"every_steps": args.every}
    if report_every_s is not None:
        logging["ray_report_every_s"] = report_every_s
    return build_config(
        {
            "model": {"preset": args.preset},
            "data": {"train_files": [str(ROOT / "data/sample/pretrain.jsonl")], "seq_len": args.seq_len},
            "optim": {"batch_size": args.batch_size // workers, "max_steps": args.steps, "warmup_steps": 0},
            "logging": logging,
            "checkpoint": {"dir": str(run_dir), "every_steps": args.steps},
            "distributed": {"num_workers": workers, "cpus_per_worker": args.cpus // workers},
        }
    )


def summarise(windows: list[dict], wall: float, tokens_per_step: int) -> dict:
    steady = [w["tokens_per_second"] for w in windows[1:]]
    rate = sum(steady) / len(steady)
    total_tokens = windows[-1]["step"] * tokens_per_step
    return {"wall": wall, "tokens_per_second": rate, "startup": wall - total_tokens / rate}


def in_process(args, run_dir: Path) -> dict:
    torch.set_num_threads(args.cpus)
    started = time.perf_counter()
    history = Trainer(make_config(args, run_dir, 1)).fit().history
    return summarise(history, time.perf_counter() - started, args.batch_size * args.seq_len)


def through_ray(args, run_dir: Path, workers: int, report_every_s: float | None = None) -> dict:
    started = time.perf_counter()
    distributed.fit(make_config(args, run_dir, workers, report_every_s))
    wall = time.perf_counter() - started
    windows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summarise(windows, wall, args.batch_size * args.seq_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="minimind-26m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (split over the workers)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10, help="log every this many steps")
    parser.add_argument("--cpus", type=int, default=2, help="cores given to each variant")
    args = parser.parse_args()
    if args.steps < 2 * args.every:
        parser.error("--steps must cover at least two log windows (the first is warm-up)")

    variants = {  # name: (workers, logging.ray_report_every_s; None: the config's default)
        "TorchTrainer x1": (1, None),
        "x1, reports every log": (1, 0.0),
        "TorchTrainer x2": (2, None),
    }
    rows = {}
    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as scratch:
        # In process before Ray starts (its daemons are busy for a while after ray.init) and again after the
        # Ray variants, with Ray idle: the mean of the two is the reference, their spread the noise.
        before = in_process(args, Path(scratch) / "local-before")
        print(f"measured in-process (before Ray): {before}", flush=True)
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=False)
        else:
            ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        for index, (name, (workers, report_every_s)) in enumerate(variants.items()):
            rows[name] = through_ray(args, Path(scratch) / f"ray{index}", workers, report_every_s)
            print(f"measured {name}: {rows[name]}", flush=True)
        after = in_process(args, Path(scratch) / "local-after")
        print(f"measured in-process (after): {after}", flush=True)
    rows = {"in-process": {key: (before[key] + after[key]) / 2 for key in before}, **rows}
    spread = abs(before["tokens_per_second"] - after["tokens_per_second"]) / rows["in-process"]["tokens_per_second"]
    base = rows["in-process"]
    print(
        f"\n{args.preset}, seq {args.seq_len}, global batch {args.batch_size}, {args.steps} steps, "
        f"log every {args.every}, {args.cpus} CPU cores, torch {torch.__version__}, ray {ray.__version__}"
    )
    print(f"{'variant':<22}{'wall s':>9}{'start-up s':>12}{'tokens/s':>11}{'tokens/s vs in-process':>25}")
    for name, row in rows.items():
        print(
            f"{name:<22}{row['wall']:>9.1f}{row['startup']:>12.1f}{row['tokens_per_second']:>11.0f}"
            f"{row['tokens_per_second'] / base['tokens_per_second']:>24.3f}x"
        )
    print(f"in-process tokens/s before Ray and after: {before['tokens_per_second']:.0f} and "
          f"{after['tokens_per_second']:.0f} ({spread:.1%} apart: the noise of these ratios)")  # fmt: skip
    slowdown = 1 - rows["TorchTrainer x1"]["tokens_per_second"] / base["tokens_per_second"]
    print(f"TorchTrainer x1 past start-up: {slowdown:+.1%} slower than in-process (target <= 5%)")


if __name__ == "__main__":
    main()
