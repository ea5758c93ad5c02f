"""Does a training worker's memory or start-up grow with the corpus? A small and a big prepared corpus, side by side.

Synthesises two pretrain jsonl corpora from data/sample/pretrain.jsonl (its lines repeated in a
seeded shuffled order), prepares each with the Ray Data pipeline on a local Ray started here (a
finished, unchanged preparation is reused), then runs a one-step ``minimind train`` on each in a
fresh subprocess and prints its peak RSS (``ru_maxrss`` of that child, from ``os.wait4``), the
seconds from launch to the printed first optimizer step (imports and model build included), the
subprocess's total wall time, and the big/small ratios.

    python benchmarks/ingest_memory.py                      # 20 MB vs 200 MB
    python benchmarks/ingest_memory.py --big-mb 2000        # vs 2 GB: preparing takes ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "pretrain.jsonl"


def synthesise(path: Path, megabytes: int) -> Path:
    """About ``megabytes`` of pretrain jsonl: the sample's lines, reshuffled on every repetition."""
    if path.exists():
        return path
    lines = SAMPLE.read_bytes().splitlines(keepends=True)
    generator = random.Random(megabytes)
    target, written = megabytes * 1_000_000, 0
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as handle:
        while written < target:
            generator.shuffle(lines)
            for line in lines:
                handle.write(line)
                written += len(line)
                if written >= target:
                    break
    partial.rename(path)
    return path


def prepare_corpus(jsonl: Path, seq_len: int):
    from minimind.data.pipeline.prepare import PrepareOptions, prepare

    return prepare(PrepareOptions(inputs=[str(jsonl)], out=str(jsonl.with_suffix("")), seq_len=seq_len, actors=2))


def train_one_step(prepared: str, seq_len: int, batch_size: int) -> dict:
    """Peak RSS and timings of a fresh ``minimind train`` process that takes one optimizer step."""
    command = [
        *(sys.executable, "-m", "minimind.cli", "train", "--model.preset", "tiny"),
        *("--data.train_files", f"[{prepared}]", "--data.seq_len", str(seq_len)),
        *("--optim.max_steps", "1", "--optim.batch_size", str(batch_size), "--runtime.device", "cpu"),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    first_step, output = None, []
    for line in process.stdout:
        output.append(line)
        if first_step is None and line.startswith("[pretrain] step=1 "):
            first_step = time.perf_counter() - started
    _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage, not all children's
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode or first_step is None:
        raise RuntimeError(f"training on {prepared} failed:\n{''.join(output)}")
    return {"rss_mb": usage.ru_maxrss / 1024, "first_step_s": first_step, "total_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-mb", type=int, default=20)
    parser.add_argument("--big-mb", type=int, default=200)
    parser.add_argument("--dir", default=str(ROOT / "runs" / "bench" / "ingest"), help="corpora and prepared data")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    import ray

    directory = Path(args.dir)
    corpora = {size: synthesise(directory / f"pretrain-{size}mb.jsonl", size) for size in (args.small_mb, args.big_mb)}
    # A cluster of our own (never someone else's), with a short temp dir for Ray's socket paths.
    ray.init(
        address="local",
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=tempfile.mkdtemp(prefix="mmray-", dir="/tmp"),
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    manifests = {}
    try:
        for size, jsonl in corpora.items():
            manifests[size] = prepare_corpus(jsonl, args.seq_len)
            print(f"[prepared] {size} MB: {manifests[size].summary().splitlines()[-1].strip()}", flush=True)
    finally:
        ray.shutdown()
    results = {size: train_one_step(manifests[size].root, args.seq_len, args.batch_size) for size in corpora}

    small, big = results[args.small_mb], results[args.big_mb]
    print(f"\n{'corpus':<12}{'blocks':>12}{'tokens':>16}{'peak RSS MB':>14}{'first step s':>14}{'total s':>10}")
    for size, result in results.items():
        train = manifests[size].splits["train"]
        print(
            f"{f'{size} MB':<12}{train['rows']:>12,}{train['tokens']:>16,}"
            f"{result['rss_mb']:>14.0f}{result['first_step_s']:>14.2f}{result['total_s']:>10.2f}"
        )
    rows = manifests[args.big_mb].splits["train"]["rows"] / manifests[args.small_mb].splits["train"]["rows"]
    print(
        f"{'big/small':<12}{rows:>11.1f}x{'':>16}{big['rss_mb'] / small['rss_mb']:>13.2f}x"
        f"{big['first_step_s'] / small['first_step_s']:>13.2f}x{big['total_s'] / small['total_s']:>9.2f}x"
    )
    print("targets: peak RSS ratio <= 1.3, first-step ratio <= 2")


if __name__ == "__main__":
    main()
