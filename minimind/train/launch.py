"""Command line of the Ray Train entry points (``ray_jobs/pretrain.py``, ``sft.py``, ``lora.py``, ...).

    python ray_jobs/pretrain.py --config recipes/tiny/pretrain.yaml --num-workers 2 --optim.lr 3e-4
    python ray_jobs/pretrain.py --config ... --num-workers 4 --strategy deepspeed --zero-stage 2
    ray job submit --working-dir . -- python ray_jobs/sft.py --config ... --init-from tiny-pretrain

The named flags are shorthands for dotted config fields (``--num-workers`` is
``--distributed.num_workers``); any other ``--dotted.field VALUE`` overrides the recipe. The run
directory is ``STORAGE_PATH/NAME`` (``--storage-path``, default ``runs``; ``--name``, default the
recipe's ``checkpoint.dir`` or ``PRESET-STAGE``): running the same command again resumes it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minimind.config import ConfigError, apply_overrides, build_config, load_yaml, parse_override_args
from minimind.model.checkpoint import resolve_checkpoint
from minimind.storage import is_uri

# Entry point -> stage and the overrides that define it (LoRA is SFT with adapters).
ENTRY_POINTS = {
    "pretrain": ("pretrain", {}),
    "sft": ("sft", {}),
    "lora": ("sft", {"lora.enabled": True}),
    "dpo": ("dpo", {}),
    "reasoning": ("reasoning", {}),
    "distill": ("distill", {}),
}

# Flag (its argparse name) -> the dotted config field it sets.
SHORTHANDS = {
    "num_workers": "distributed.num_workers",
    "use_gpu": "distributed.use_gpu",
    "cpus_per_worker": "distributed.cpus_per_worker",
    "max_failures": "distributed.max_failures",
    "strategy": "distributed.strategy",
    "zero_stage": "distributed.zero_stage",
    "offload_optimizer": "distributed.offload_optimizer",
    "wandb": "logging.wandb",
}


def build_parser(entry: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"ray_jobs/{entry}.py",
        description=f"Run the {entry} stage with Ray Train. Extra --dotted.field VALUE options override the recipe.",
    )
    parser.add_argument("--config", help="YAML recipe (see recipes/)")
    parser.add_argument("--num-workers", type=int, help="Ray Train workers (distributed.num_workers)")
    parser.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker")
    parser.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per worker")
    parser.add_argument("--strategy", help="how workers share the model: ddp (default) or deepspeed")
    parser.add_argument("--zero-stage", type=int, help="DeepSpeed ZeRO stage 0-3 (with --strategy deepspeed)")
    parser.add_argument(
        "--offload-optimizer", action="store_true", default=None, help="ZeRO-2/3: optimizer state in host memory"
    )
    parser.add_argument("--storage-path", help="where runs live: a shared path or s3://, gs:// (default: runs)")
    parser.add_argument("--name", help=f"run name (default: the recipe's checkpoint.dir, else PRESET-{entry})")
    parser.add_argument("--max-failures", type=int, help="worker-group restarts from the last checkpoint (-1: always)")
    parser.add_argument("--wandb", action="store_true", default=None, help="log to Weights & Biases (offline w/o key)")
    parser.add_argument(
        "--init-from", help="start from these weights: a checkpoint, a run directory, or a run name in the storage path"
    )
    return parser


def resolve_init_from(value: str, storage_path: str) -> str:
    """A checkpoint or run directory as given, else a run of that name under the storage path."""
    if is_uri(value) or Path(value).exists():
        return value
    candidate = f"{storage_path.rstrip('/')}/{value}"
    if not is_uri(candidate) and not Path(candidate).exists():
        raise ConfigError(f"checkpoint.init_from: {value!r} is neither a directory nor a run in {storage_path}")
    try:
        resolve_checkpoint(candidate)  # a clear error now when the run has no checkpoint yet
    except FileNotFoundError as error:
        raise ConfigError(f"checkpoint.init_from: {error}") from None
    return candidate


def config_from_args(entry: str, argv: list[str]):
    """The run's :class:`TrainConfig` from the entry point's flags and dotted overrides."""
    args, rest = build_parser(entry).parse_known_args(argv)
    stage, defining = ENTRY_POINTS[entry]
    raw = load_yaml(args.config) if args.config else {}
    if raw.get("stage", stage) != stage:
        raise ConfigError(f"stage: ray_jobs/{entry}.py runs {stage!r} but {args.config} says {raw['stage']!r}")
    overrides = {"stage": stage, **defining, **parse_override_args(rest)}
    for flag, field in SHORTHANDS.items():
        if getattr(args, flag) is not None:
            overrides[field] = getattr(args, flag)
    merged = apply_overrides(raw, overrides)
    recipe_dir = merged.get("checkpoint", {}).get("dir")
    storage = args.storage_path or (str(Path(recipe_dir).parent) if recipe_dir else "runs")
    preset = merged.get("model", {}).get("preset", "minimind-26m")
    name = args.name or (Path(recipe_dir).name if recipe_dir else f"{preset}-{entry}")
    overrides["checkpoint.dir"] = f"{storage.rstrip('/')}/{name}"
    if args.init_from:
        overrides["checkpoint.init_from"] = resolve_init_from(args.init_from, storage)
    return build_config(raw, overrides)


def main(entry: str, argv: list[str] | None = None):
    """Parse, connect to Ray (``RAY_ADDRESS`` or a new local instance), train, return Ray's Result."""
    try:
        config = config_from_args(entry, sys.argv[1:] if argv is None else argv)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    import ray

    from minimind.train.distributed import fit

    ray.init(ignore_reinit_error=True)
    try:
        return fit(config)
    except ConfigError as error:  # checks that need the cluster (e.g. memory for offload)
        print(f"config error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
