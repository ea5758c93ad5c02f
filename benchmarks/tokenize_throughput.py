"""Corpus pipeline throughput and memory: Ray Data (1 and 2 actors) vs one process calling encode_batch.

Builds pretrain jsonl inputs of the requested sizes by repeating the bundled sample (each copy of
a document gets a distinct suffix, so nothing is a duplicate), then prints side by side:

- MB/s and tokens/s of ``prepare`` with 1 and 2 tokenizer actors, and of a single process that
  streams the same file through ``tokenizer.encode_batch`` in batches of 1,000 lines, with ratios;
- peak RSS of the whole pipeline (driver plus every Ray worker, sampled every 0.2 s) at two input
  sizes: it should stay flat, because nothing holds the corpus in memory.

    python benchmarks/tokenize_throughput.py                       # 200 MB throughput; 0.5 and 2 GB memory
    python benchmarks/tokenize_throughput.py --throughput-mb 50 --memory-mb 100 400   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import ray

from minimind.data.pipeline.prepare import PrepareOptions, prepare
from minimind.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def build_input(path: Path, megabytes: int) -> Path:
    """A pretrain jsonl of about ``megabytes`` MB made from the bundled sample."""
    texts = [json.loads(line)["text"] for line in (ROOT / "data/sample/pretrain.jsonl").open(encoding="utf-8")]
    target = megabytes * 1_000_000
    written, copy = 0, 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < target:
            for text in texts:
                line = json.dumps({"text": f"{text} ({copy})"}, ensure_ascii=False) + "\n"
                handle.write(line)
                written += len(line.encode("utf-8"))
                if written >= target:
                    break
            copy += 1
    return path


class PeakRSS:
    """Peak of the summed RSS of this process and all its descendants (Ray's raylet and workers)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _family_rss() -> int:
        """Linux /proc: RSS of this process and every descendant, in bytes."""
        parents, rss = {}, {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/statm") as handle:
                    rss[int(entry)] = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError, IndexError):
                continue
        family, frontier = {os.getpid()}, [os.getpid()]
        while frontier:
            parent = frontier.pop()
            for pid, ppid in parents.items():
                if ppid == parent and pid not in family:
                    family.add(pid)
                    frontier.append(pid)
        return sum(rss.get(pid, 0) for pid in family)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._family_rss())
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_pipeline(path: Path, out: Path, actors: int, seq_len: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    with PeakRSS() as memory:
        start = time.perf_counter()
        manifest = prepare(
            PrepareOptions(
                inputs=[str(path)], out=str(out), format="pretrain", seq_len=seq_len, val_fraction=0.01, actors=actors
            )
        )
        seconds = time.perf_counter() - start
    tokens = sum(split["tokens"] for split in manifest.splits.values())
    return {"seconds": seconds, "megabytes": path.stat().st_size / 1e6, "tokens": tokens, "peak_rss": memory.peak}


def run_single_process(path: Path) -> dict:
    tokenizer = load_tokenizer()
    start = time.perf_counter()
    tokens, batch = 0, []
    with PeakRSS() as memory, open(path, encoding="utf-8") as handle:
        for line in handle:
            batch.append(json.loads(line)["text"])
            if len(batch) == 1000:
                tokens += sum(len(ids) + 1 for ids in tokenizer.encode_batch(batch))
                batch = []
        if batch:
            tokens += sum(len(ids) + 1 for ids in tokenizer.encode_batch(batch))
    return {
        "seconds": time.perf_counter() - start,
        "megabytes": path.stat().st_size / 1e6,
        "tokens": tokens,
        "peak_rss": memory.peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--throughput-mb", type=int, default=200)
    parser.add_argument("--memory-mb", type=int, nargs=2, default=[500, 2000])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--work-dir", default=None, help="where inputs and outputs go (default: a temp dir)")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ray.init(include_dashboard=False, log_to_driver=False)
    cpus = int(ray.cluster_resources()["CPU"])

    source = build_input(work / f"corpus_{args.throughput_mb}mb.jsonl", args.throughput_mb)
    rows = {
        "single process encode_batch": run_single_process(source),
        "Ray Data, 1 actor": run_pipeline(source, work / "out1", 1, args.seq_len),
        "Ray Data, 2 actors": run_pipeline(source, work / "out2", 2, args.seq_len),
    }
    base = rows["single process encode_batch"]
    print(
        f"\nthroughput on {base['megabytes']:.0f} MB of pretrain jsonl, {cpus} CPUs "
        f"(actors are capped at CPUs - 1 so the read tasks keep a core)"
    )
    print(f"{'':<30}{'MB/s':>8}{'tokens/s':>12}{'vs single':>11}{'peak RSS':>11}")
    for name, row in rows.items():
        rate = row["megabytes"] / row["seconds"]
        print(
            f"{name:<30}{rate:>8.2f}{row['tokens'] / row['seconds']:>12.0f}"
            f"{rate / (base['megabytes'] / base['seconds']):>10.2f}x{row['peak_rss'] / 2**20:>9.0f}MB"
        )
    source.unlink()

    print("\npeak RSS of the pipeline (driver + all Ray workers) by input size, 2 actors")
    peaks = []
    for megabytes in args.memory_mb:
        path = build_input(work / f"corpus_{megabytes}mb.jsonl", megabytes)
        row = run_pipeline(path, work / "out_mem", 2, args.seq_len)
        peaks.append(row["peak_rss"])
        print(
            f"{megabytes:>6} MB input: peak RSS {row['peak_rss'] / 2**20:7.0f} MB, "
            f"{row['megabytes'] / row['seconds']:.2f} MB/s, {row['tokens']:,} tokens"
        )
        path.unlink()
    print(
        f"peak RSS ratio {args.memory_mb[1]} MB / {args.memory_mb[0]} MB input: {peaks[1] / peaks[0]:.2f}x "
        f"(input ratio {args.memory_mb[1] / args.memory_mb[0]:.1f}x)"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
