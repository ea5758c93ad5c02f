"""Serve a checkpoint over OpenAI's HTTP API with Ray Serve (chat and text completions, streaming, LoRA adapters).

    python ray_jobs/serve.py --checkpoint runs/experiments/sample/sft                # http://127.0.0.1:8000/v1
    python ray_jobs/serve.py --checkpoint C --lora identity=runs/lora --replicas 2 --gpus-per-replica 0.5
    ray job submit --working-dir . -- python ray_jobs/serve.py --checkpoint /mnt/shared/minimind/sample-sweep/sft

Any OpenAI client then talks to it (``OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")``, model
``minimind`` or an adapter's name). Concurrent requests are decoded in batches on each replica. Connects to
RAY_ADDRESS when set, else starts Ray locally; runs until stopped (Ctrl-C, or ``serve shutdown``).
The server listens on --host (loopback by default; reach a cluster's through ``ray dashboard``-style port
forwarding, or publish it deliberately with --host 0.0.0.0 behind your own authentication).
"""

from __future__ import annotations

import argparse
import time

import ray
from ray import serve

from minimind.serve.app import ServeOptions, application


def parse_adapter(text: str) -> tuple[str, str]:
    name, equals, path = text.partition("=")
    if not equals or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=ADAPTER_DIR, got {text!r}")
    return name, path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint, run or Hugging Face export directory")
    parser.add_argument("--name", default="minimind", help="the model's name in the API")
    parser.add_argument("--lora", nargs="+", type=parse_adapter, default=[], metavar="NAME=ADAPTER_DIR",
                        help="LoRA adapters on the checkpoint, each served as the model NAME")  # fmt: skip
    parser.add_argument("--tokenizer", default=None, help="default: the checkpoint's own, else the bundled one")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    gpu = parser.add_mutually_exclusive_group()
    gpu.add_argument("--use-gpu", action="store_true", help="one GPU per replica")
    gpu.add_argument("--gpus-per-replica", type=float, default=0.0, help="a GPU share per replica (e.g. 0.25)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together on a replica")
    args = parser.parse_args(argv)
    if args.replicas < 1 or args.max_batch_size < 1:
        parser.error("--replicas and --max-batch-size must be at least 1")
    names = [args.name, *(name for name, _ in args.lora)]
    if len(set(names)) != len(names):
        parser.error(f"model names must differ: {names}")
    options = ServeOptions(args.checkpoint, args.name, dict(args.lora), args.tokenizer,
                           max_batch_size=args.max_batch_size)  # fmt: skip
    gpus = 1.0 if args.use_gpu else args.gpus_per_replica
    ray.init(ignore_reinit_error=True)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application(options, args.replicas, args.cpus_per_replica, gpus), name="minimind", route_prefix="/")
    print(f"serving {', '.join(names)} at http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
