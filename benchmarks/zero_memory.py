"""Memory per rank under DDP and DeepSpeed ZeRO-1, -2 and -3, side by side.

Each strategy trains the same preset (default: minimind-104m, MiniMind2's 104M) for a few steps
with 2 Ray Train workers through the one loop (``Trainer`` with the strategy the jobs build).
Every rank then reports:

- peak RSS of its process (``ru_maxrss``), and ``run_peak``: that peak less the RSS before the
  strategy, data and model were built (libraries excluded); on GPUs also the CUDA allocator's peak;
- optimizer-state bytes it holds: Adam's moments plus, under ZeRO, the fp32 master partitions the
  engine keeps beside the model's parameters (DDP's master weights are the parameters themselves);
- parameter bytes resident on it (ZeRO-3 keeps only its partition between steps);
- tokens/s of the measured steps (all workers together).

Printed with each strategy's ratio to DDP. ZeRO-1/2 should hold about 1/world of DDP's Adam
moments per rank; peak RSS also counts the process's libraries (torch, Ray, DeepSpeed), the data
and the activations, which ZeRO does not shard.

    python benchmarks/zero_memory.py                            # minimind-104m, seq 256, 2 workers
    python benchmarks/zero_memory.py --preset minimind-26m --steps 5
    python benchmarks/zero_memory.py --use-gpu                  # on a GPU node: bf16, CUDA peaks
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import psutil
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from minimind.config import build_config, config_to_dict
from minimind.train.distributed import build_strategy
from minimind.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = {
    "ddp": {"strategy": "ddp"},
    "zero1": {"strategy": "deepspeed", "zero_stage": 1},
    "zero2": {"strategy": "deepspeed", "zero_stage": 2},
    "zero3": {"strategy": "deepspeed", "zero_stage": 3},
}


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def optimizer_state_bytes(trainer: Trainer) -> dict:
    """Adam moments and separate fp32 master copies held by this rank."""
    optimizer = trainer.optimizer
    base = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the torch optimizer
    moments = tensor_bytes(value for state in base.state.values() for value in state.values())
    masters = 0
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO-1/2, ZeRO-3
        masters += tensor_bytes(getattr(optimizer, name, []) or [])
    return {"adam_moments": moments, "fp32_masters": masters}


def resident_parameter_bytes(model: torch.nn.Module) -> int:
    total = 0
    for parameter in model.parameters():
        partition = getattr(parameter, "ds_tensor", None)  # ZeRO-3: this rank's partition
        total += tensor_bytes([partition if partition is not None else parameter.data])
    return total


def measure_worker(setup: dict) -> None:
    """Ray Train worker: build the loop with the job's strategy, train, write this rank's figures."""
    config = build_config(setup["config"])
    device = ray.train.torch.get_device()
    if not config.distributed.use_gpu:
        torch.set_num_threads(int(config.distributed.cpus_per_worker))
    baseline = psutil.Process().memory_info().rss  # libraries loaded, nothing of the run built yet
    strategy = build_strategy(config, device)
    trainer = Trainer(config, strategy=strategy, run=None, device=device)
    trainer.fit(stop_at_step=1)  # warm-up step: allocator and engine buffers settle
    started = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - started
    tokens = sum(m["tokens_per_second"] for m in result.history[1:]) / max(1, len(result.history) - 1)
    figures = {
        "rank": strategy.rank,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "run_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline,
        "cuda_peak": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "parameters": resident_parameter_bytes(trainer.model),
        "tokens_per_second": tokens,
        "seconds": seconds,
        **optimizer_state_bytes(trainer),
    }
    out = Path(setup["out"]) / f"{setup['name']}-rank{strategy.rank}.json"
    out.write_text(json.dumps(figures))


def run(name: str, args, out: Path) -> list[dict]:
    workers = args.workers
    raw = {
        "model": {"preset": args.preset},
        "data": {"train_files": [str(ROOT / "data/sample/pretrain.jsonl")], "seq_len": args.seq_len},
        "optim": {"batch_size": args.batch_size, "max_steps": args.steps + 1, "warmup_steps": 0},
        "logging": {"every_steps": 1},
        "distributed": {
            "num_workers": workers,
            "use_gpu": args.use_gpu,
            "cpus_per_worker": args.cpus_per_worker,
            **STRATEGIES[name],
        },
    }
    config = build_config(raw)
    resources = {"CPU": args.cpus_per_worker, **({"GPU": 1} if args.use_gpu else {})}
    trainer = TorchTrainer(
        measure_worker,
        train_loop_config={"config": config_to_dict(config), "out": str(out), "name": name},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=args.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"zero-memory-{name}", storage_path=str(out / "ray")),
    )
    trainer.fit()
    return [json.loads((out / f"{name}-rank{rank}.json").read_text()) for rank in range(workers)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="minimind-104m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2, help="per worker")
    parser.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up step)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=1)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--only", nargs="*", choices=list(STRATEGIES), help="strategies to run (default: all)")
    args = parser.parse_args()
    ray.init(ignore_reinit_error=True)
    names = args.only or list(STRATEGIES)
    results = {}
    with tempfile.TemporaryDirectory(prefix="zero-memory-") as tmp:
        for name in names:
            results[name] = run(name, args, Path(tmp))
            print(f"[{name}] done", flush=True)
    gib = 2**30

    def worst(name: str, key: str) -> float:
        return max(rank[key] or 0 for rank in results[name])

    print(f"\n{args.preset}, {args.workers} workers, seq {args.seq_len}, batch {args.batch_size}/worker, "
          f"{'GPU' if args.use_gpu else 'CPU fp32'}; per rank (max over ranks), ratio to ddp")  # fmt: skip
    columns = ["peak_rss", "run_peak", "adam_moments", "fp32_masters", "parameters"]
    columns += ["cuda_peak"] if args.use_gpu else []
    print("| strategy | " + " | ".join(columns) + " | tokens/s |")
    print("|---" * (len(columns) + 2) + "|")
    reference = "ddp" if "ddp" in results else names[0]
    for name in names:
        cells = []
        for key in columns:
            value, base = worst(name, key), worst(reference, key)
            ratio = f" ({value / base:.2f}x)" if base else ""
            cells.append(f"{value / gib:.3f} GiB{ratio}")
        rate = results[name][0]["tokens_per_second"]  # the loop's figure is already over all workers
        base_rate = results[reference][0]["tokens_per_second"]
        cells.append(f"{rate:.0f} ({rate / base_rate:.2f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
