"""Corpus pipeline throughput and memory: Ray Data (1 and 2 actors) vs one process calling encode_batch.

Builds pretrain jsonl inputs of the requested sizes by repeating the bundled sample (each copy of
a document gets a distinct suffix, so nothing is a duplicate), then prints side by side:

- MB/s and tokens/s of ``prepare`` with 1 and 2 tokenizer actors, and of a single process that
  streams the same file through ``tokenizer.encode_batch`` in batches of 1,000 lines, with ratios;
- peak memory of the whole pipeline (driver plus every Ray worker, sampled every 0.2 s) at three or
  more input sizes, as summed RSS and as PSS (shared object-store pages counted once): it should stay
  flat, because nothing holds the corpus in memory.

The single process runs before Ray starts, so neither its time nor its memory includes Ray's daemons.

    python benchmarks/tokenize_throughput.py                 # 200 MB throughput; 0.5, 1 and 2 GB memory
    python benchmarks/tokenize_throughput.py --throughput-mb 50 --memory-mb 100 200 400   # quicker
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


class PeakMemory:
    """Peak memory of this process and all its descendants (Ray's raylet and workers), sampled.

    ``rss`` sums each process's resident set; pages of Ray's shared-memory object store count
    once per process that maps them. ``pss`` (proportional set size) splits shared pages among
    the processes sharing them, so it is the footprint the machine actually pays.
    """

    def __init__(self):
        self.rss = 0
        self.pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _family() -> set[int]:
        parents = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as handle:
                        parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
        family, frontier = {os.getpid()}, [os.getpid()]
        while frontier:
            parent = frontier.pop()
            for pid, ppid in parents.items():
                if ppid == parent and pid not in family:
                    family.add(pid)
                    frontier.append(pid)
        return family

    @staticmethod
    def _memory(pid: int) -> tuple[int, int]:
        rss = pss = 0
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Rss:"):
                        rss = int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss = int(line.split()[1]) * 1024
        except OSError:
            pass
        return rss, pss

    def _run(self):
        while not self._stop.is_set():
            sizes = [self._memory(pid) for pid in self._family()]
            self.rss = max(self.rss, sum(r for r, _ in sizes))
            self.pss = max(self.pss, sum(p for _, p in sizes))
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_pipeline(path: Path, out: Path, actors: int, seq_len: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    with PeakMemory() as memory:
        start = time.perf_counter()
        manifest = prepare(
            PrepareOptions(
                inputs=[str(path)], out=str(out), format="pretrain", seq_len=seq_len, val_fraction=0.01, actors=actors
            )
        )
        seconds = time.perf_counter() - start
    tokens = sum(split["tokens"] for split in manifest.splits.values())
    return {
        "seconds": seconds,
        "megabytes": path.stat().st_size / 1e6,
        "tokens": tokens,
        "peak_rss": memory.rss,
        "peak_pss": memory.pss,
    }


def run_single_process(path: Path) -> dict:
    tokenizer = load_tokenizer()
    start = time.perf_counter()
    tokens, batch = 0, []
    with PeakMemory() as memory, open(path, encoding="utf-8") as handle:
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
        "peak_rss": memory.rss,
        "peak_pss": memory.pss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--throughput-mb", type=int, default=200)
    parser.add_argument("--memory-mb", type=int, nargs="+", default=[500, 1000, 2000], help="input sizes (3 or more)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--work-dir", default=None, help="where inputs and outputs go (default: a temp dir)")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if len(args.memory_mb) < 3:
        parser.error("--memory-mb: give at least three sizes (two points cannot show a trend)")

    source = build_input(work / f"corpus_{args.throughput_mb}mb.jsonl", args.throughput_mb)
    rows = {"single process encode_batch": run_single_process(source)}  # before Ray: no daemons beside it
    ray.init(include_dashboard=False, log_to_driver=False)
    cpus = int(ray.cluster_resources()["CPU"])
    rows["Ray Data, 1 actor"] = run_pipeline(source, work / "out1", 1, args.seq_len)
    rows["Ray Data, 2 actors"] = run_pipeline(source, work / "out2", 2, args.seq_len)
    base = rows["single process encode_batch"]
    print(
        f"\nthroughput on {base['megabytes']:.0f} MB of pretrain jsonl, {cpus} CPUs "
        f"(actors leave one CPU to the read tasks; on 2 CPUs each actor takes half a CPU)"
    )
    print(f"{'':<30}{'MB/s':>8}{'tokens/s':>12}{'vs single':>11}{'peak RSS':>11}{'peak PSS':>11}")
    for name, row in rows.items():
        rate = row["megabytes"] / row["seconds"]
        print(
            f"{name:<30}{rate:>8.2f}{row['tokens'] / row['seconds']:>12.0f}"
            f"{rate / (base['megabytes'] / base['seconds']):>10.2f}x"
            f"{row['peak_rss'] / 2**20:>9.0f}MB{row['peak_pss'] / 2**20:>9.0f}MB"
        )
    source.unlink()

    print("\npeak memory of the pipeline (driver + all Ray workers) by input size, 2 actors")
    peaks = []
    for megabytes in args.memory_mb:
        path = build_input(work / f"corpus_{megabytes}mb.jsonl", megabytes)
        row = run_pipeline(path, work / "out_mem", 2, args.seq_len)
        peaks.append(row)
        print(
            f"{megabytes:>6} MB input: peak RSS {row['peak_rss'] / 2**20:7.0f} MB, "
            f"peak PSS {row['peak_pss'] / 2**20:7.0f} MB, "
            f"{row['megabytes'] / row['seconds']:.2f} MB/s, {row['tokens']:,} tokens"
        )
        path.unlink()
    small = peaks[0]
    for megabytes, row in zip(args.memory_mb[1:], peaks[1:]):
        print(
            f"{megabytes} MB vs {args.memory_mb[0]} MB input ({megabytes / args.memory_mb[0]:.1f}x): "
            f"peak RSS {row['peak_rss'] / small['peak_rss']:.2f}x, peak PSS {row['peak_pss'] / small['peak_pss']:.2f}x"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
