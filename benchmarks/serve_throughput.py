"""What the server does with concurrent requests: requests/s and tokens/s at 1, 4 and 16 clients at once,
decoded in batches (the server's default, up to 16 requests per forward pass) and one at a time
(``max_batch_size`` 1), side by side with their ratio.

One replica serves the preset's weights (random by default: replies then run to ``--max-tokens``, as a
trained model's rarely do, so every arm generates the same tokens; ``--checkpoint`` serves real ones).
Each client sends chat requests back to back with the official ``openai`` client until ``--requests``
are answered; a warm-up request goes first.

    python benchmarks/serve_throughput.py                           # minimind-26m, 64 tokens a reply
    python benchmarks/serve_throughput.py --preset tiny --requests 64
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402

from minimind.config import build_config  # noqa: E402
from minimind.model.checkpoint import save_model  # noqa: E402
from minimind.model.minimind import MiniMindLM  # noqa: E402
from minimind.serve.app import ServeOptions, application  # noqa: E402

QUESTIONS = ["你好，请介绍一下你自己。", "中国的首都是哪里？", "写一首关于春天的诗。", "一年有几个季节？"]


def measure(client: openai.OpenAI, concurrency: int, requests: int, max_tokens: int) -> dict:
    def one(index: int) -> tuple[float, int]:
        started = time.perf_counter()
        reply = client.chat.completions.create(
            model="minimind", messages=[{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
            max_tokens=max_tokens, temperature=0.8, seed=index,
        )  # fmt: skip
        return time.perf_counter() - started, reply.usage.completion_tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    seconds = time.perf_counter() - started
    tokens = sum(count for _, count in results)
    return {"concurrency": concurrency, "requests": requests, "seconds": seconds, "tokens": tokens,
            "requests_per_s": requests / seconds, "tokens_per_s": tokens / seconds,
            "p50_latency_s": statistics.median(latency for latency, _ in results)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minimind-26m")
    parser.add_argument("--checkpoint", help="serve these weights instead of the preset's random ones")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--cpus", type=float, default=2.0, help="CPUs of the replica (its torch threads)")
    parser.add_argument("--out", type=Path, help="write the measurements here as JSON")
    args = parser.parse_args()

    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = tempfile.mkdtemp(prefix="serve-bench-")
        save_model(MiniMindLM(build_config({"model": {"preset": args.preset}}).model), checkpoint)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(ignore_reinit_error=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    rows: dict[str, list[dict]] = {}
    for arm, batch in (("batched", 16), ("one at a time", 1)):
        options = ServeOptions(checkpoint, max_batch_size=batch, threads=int(args.cpus))
        serve.run(application(options, cpus_per_replica=args.cpus), name="minimind", route_prefix="/")
        measure(client, 1, 1, 8)  # warm-up
        rows[arm] = [measure(client, c, args.requests, args.max_tokens) for c in args.concurrency]
        serve.delete("minimind")
    serve.shutdown()

    print(f"\n{args.checkpoint or args.preset}: {args.requests} chat requests per level, up to {args.max_tokens} "
          f"tokens each, one replica of {args.cpus:g} CPUs")  # fmt: skip
    print(f"{'clients':>8} | {'batched req/s':>14} {'tok/s':>8} {'p50 s':>7} | {'one at a time req/s':>20} "
          f"{'tok/s':>8} {'p50 s':>7} | {'tok/s ratio':>11}")  # fmt: skip
    for batched, single in zip(rows["batched"], rows["one at a time"]):
        ratio = batched["tokens_per_s"] / single["tokens_per_s"]
        print(f"{batched['concurrency']:>8} | {batched['requests_per_s']:>14.2f} {batched['tokens_per_s']:>8.1f} "
              f"{batched['p50_latency_s']:>7.2f} | {single['requests_per_s']:>20.2f} {single['tokens_per_s']:>8.1f} "
              f"{single['p50_latency_s']:>7.2f} | {ratio:>10.2f}x")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"args": {**vars(args), "out": str(args.out)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
