"""The ``minimind`` command: train, inspect, sample, convert and build tokenizers.

Training options are the config's dotted paths: ``minimind train --config recipe.yaml
--optim.lr 3e-4 --model.preset tiny``; the same paths are what Tune search spaces address.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_info(args: argparse.Namespace, overrides: dict) -> None:
    import torch

    from minimind.model import MiniMindLM, flops_per_token

    if bool(args.preset) == bool(args.config):
        raise SystemExit("minimind info: name a PRESET or give --config RECIPE (the model and cost of its run)")
    run = None
    if args.config:
        from minimind.config import load_config

        run = load_config(args.config, overrides)
        config = run.model
    else:
        config = _model_fields("info", args.preset, overrides)
    with torch.device("meta"):
        model = MiniMindLM(config)
    total = model.num_parameters()
    print(f"{config.preset}: {total:,} parameters")
    if config.moe.enabled:
        active = model.num_parameters(active_only=True)
        print(
            f"  active per token: {active:,} (top-{config.moe.top_k} of {config.moe.num_routed_experts} routed experts)"
        )
    else:
        active = total
    print(
        f"  hidden {config.hidden_size} x {config.num_layers} layers, "
        f"{config.num_heads} q / {config.num_kv_heads} kv heads{', QK-norm' if config.qk_norm else ''}, "
        f"ffn {config.ffn_size}, vocab {config.vocab_size}"
    )
    if run is None:
        print(f"  training FLOPs/token at seq 512: {flops_per_token(config, active, 512):.3e} (6N + attention)")
    else:  # the count the run's FLOPs use: LoRA's frozen weights get no weight gradient
        from minimind.train.compute import model_flops_per_token

        per_token = model_flops_per_token(run)
        print(f"  training FLOPs/token at seq {run.data.seq_len}: {per_token:.3e} (6N + attention)")
        _print_run_cost(run)


INFO_MFU = 0.4
INFO_GPUS = ("H100", "A100", "L40S")


def _print_run_cost(config) -> None:
    """A recipe's run: its length, training FLOPs and what they take on a GPU at a stated utilisation."""
    from minimind.train.compute import run_cost, tokens_per_step
    from minimind.train.metrics import PEAK_BF16_TFLOPS

    cost = run_cost(config)
    print(f"  run: {cost.steps:,} steps x {tokens_per_step(config):,} tokens = {cost.tokens:,} tokens ({cost.how})")
    hours = [f"{cost.flops / (PEAK_BF16_TFLOPS[gpu] * 1e12 * INFO_MFU) / 3600:.3g} h on one {gpu}" for gpu in INFO_GPUS]
    print(f"  training FLOPs: {cost.flops:.3e}; at {INFO_MFU:.0%} MFU (bf16 dense peaks): {', '.join(hours)}")


def _cmd_train(args: argparse.Namespace, overrides: dict) -> None:
    from minimind.config import load_config
    from minimind.train.loop import train
    from minimind.train.runtime import check_gpu_request

    config = load_config(args.config, overrides)
    check_gpu_request(config)  # a GPU run that sees no CUDA stops here, not after training on the CPU
    result = train(config)
    print(f"[done] {result.steps} steps; {result.rejects}; checkpoint: {result.checkpoint}")


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
    }


def _cmd_generate(args: argparse.Namespace, overrides: dict) -> None:
    from minimind.devices import select_device
    from minimind.eval.samples import CHAT_PROMPTS, CONTINUATION_PROMPTS, generate_samples
    from minimind.model.checkpoint import load_model
    from minimind.model.hf import checkpoint_tokenizer
    from minimind.tokenizer import load_tokenizer

    model = load_model(args.checkpoint, select_device(args.device), merge=True)
    tokenizer = load_tokenizer(checkpoint_tokenizer(args.checkpoint, args.tokenizer))
    prompts = args.prompt or list(CHAT_PROMPTS if args.chat else CONTINUATION_PROMPTS)
    started: list[int] = []

    def show(index: int, piece: str) -> None:
        if not piece:  # a new prompt begins
            print(f"{chr(10) if started else ''}>>> {prompts[index]}", flush=True)
            started.append(index)
        print(piece, end="", flush=True)

    samples = generate_samples(
        model, tokenizer, prompts, chat=args.chat, seed=args.seed, on_text=show, **_sampling_kwargs(args)
    )
    print(flush=True)
    if args.save:
        Path(args.save).write_text(json.dumps(samples, ensure_ascii=False, indent=2), encoding="utf-8")


def _cmd_chat(args: argparse.Namespace, overrides: dict) -> None:
    from minimind.chat import run_chat

    run_chat(args, _sampling_kwargs(args))


def _cmd_export_hf(args: argparse.Namespace, overrides: dict) -> None:
    from minimind.model.checkpoint import load_model
    from minimind.model.hf import checkpoint_tokenizer, export_hf
    from minimind.tokenizer import load_tokenizer

    model = load_model(args.checkpoint, merge=True)
    tokenizer = load_tokenizer(checkpoint_tokenizer(args.checkpoint, args.tokenizer))
    print(f"wrote {export_hf(model, tokenizer, args.out)}")


def _cmd_import_hf(args: argparse.Namespace, overrides: dict) -> None:
    from minimind.model.checkpoint import save_model
    from minimind.model.hf import import_hf

    model = import_hf(args.hf_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
    print(f"wrote checkpoint {out} ({model.num_parameters():,} parameters)")


def _model_fields(command: str, preset: str, overrides: dict):
    """A model config from a preset and ``--model.*`` overrides (other fields describe no model)."""
    from minimind.config import apply_overrides, build_model_config

    unused = sorted(key for key in overrides if not key.startswith("model."))
    if unused:
        raise SystemExit(f"minimind {command}: only model.* fields describe a model, not {', '.join(unused)}")
    return build_model_config(apply_overrides({"model": {"preset": preset}}, overrides)["model"])


def _cmd_import_minimind(args: argparse.Namespace, overrides: dict) -> None:
    from minimind.model.checkpoint import save_model
    from minimind.model.minimind_format import import_minimind_hf, import_minimind_pth

    if bool(args.pth) == bool(args.from_hf):
        raise SystemExit("minimind import-minimind: give either a .pth file (with --preset) or --from-hf DIR")
    if args.from_hf:
        if overrides or args.preset:
            raise SystemExit("minimind import-minimind: --from-hf reads the architecture from its config.json")
    if not (args.from_hf or args.preset):
        raise SystemExit("minimind import-minimind: a .pth holds no architecture; name its --preset")
    try:
        if args.from_hf:
            model = import_minimind_hf(args.from_hf)
        else:
            model = import_minimind_pth(args.pth, _model_fields("import-minimind", args.preset, overrides))
    except (ValueError, FileNotFoundError) as error:  # weights that do not fit: say which, no traceback
        raise SystemExit(f"minimind import-minimind: {error}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
    print(f"wrote checkpoint {out} ({model.num_parameters():,} parameters)")


def _cmd_export_minimind(args: argparse.Namespace, overrides: dict) -> None:
    from minimind.model.checkpoint import load_model
    from minimind.model.minimind_format import export_minimind_pth

    model = load_model(args.checkpoint, merge=True)
    print(f"wrote {export_minimind_pth(model, args.out, args.dtype)} ({args.dtype})")


def _cmd_consolidate(args: argparse.Namespace, overrides: dict) -> None:
    from minimind.train.zero import consolidate

    target = consolidate(args.checkpoint, args.out)
    print(f"wrote fp32 weights of {args.checkpoint} into checkpoint {target}")


def _cmd_train_tokenizer(args: argparse.Namespace, overrides: dict) -> None:
    from minimind.data.corpus import train_tokenizer_on_files

    max_bytes = int(args.sample_mb * 1e6) if args.sample_mb else None
    tokenizer = train_tokenizer_on_files(args.files, args.out, args.vocab_size, max_bytes)
    print(f"wrote {args.out}: {tokenizer.vocab_size} tokens, fingerprint {tokenizer.fingerprint}")


def _cmd_prepare(args: argparse.Namespace, overrides: dict) -> None:
    from minimind.data.pipeline.cli import run_prepare

    run_prepare(args)


def _cmd_check_cluster(args: argparse.Namespace, overrides: dict) -> None:
    from minimind.cluster import ClusterFileError, check_cluster_file

    failed = False
    for file in args.files:
        try:
            check_cluster_file(file)
            print(f"{file}: ok")
        except ClusterFileError as error:
            print(error, file=sys.stderr)
            failed = True
    if failed:
        raise SystemExit(1)


def _add_sampling_flags(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--tokenizer", default=None, help="default: the export's own, else the bundled one")
    parser.add_argument(
        "--device", default="auto", help="auto (a GPU when this process sees one, else the CPU), cpu, cuda or cuda:N"
    )
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.85, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.85)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minimind", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser(
        "info", help="parameters, shape and FLOPs of a model preset, or of a recipe's model and run (--config)"
    )
    info.add_argument("preset", nargs="?", help="a preset name (or give --config)")
    info.add_argument("--config", help="a recipe: its model, and its run's tokens, FLOPs and GPU-hours")
    info.set_defaults(run=_cmd_info)

    train = commands.add_parser("train", help="run one training stage; extra --dotted.path VALUE override the config")
    train.add_argument("--config", help="YAML recipe (see recipes/)")
    train.set_defaults(run=_cmd_train)

    gen = commands.add_parser("generate", help="sample continuations (or chat replies) from a checkpoint")
    gen.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    gen.add_argument("--prompt", action="append", help="repeatable; default: MiniMind's evaluation prompts")
    gen.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    _add_sampling_flags(gen, max_new_tokens=128)
    gen.add_argument("--save", help="write prompts and outputs to this JSON file")
    gen.set_defaults(run=_cmd_generate)

    chat = commands.add_parser("chat", help="streaming multi-turn chat in the terminal")
    chat.add_argument("--checkpoint", required=True, help="checkpoint, run or Hugging Face export directory")
    chat.add_argument("--adapter", help="LoRA checkpoint whose adapters to apply")
    chat.add_argument("--system", help="system prompt")
    _add_sampling_flags(chat, max_new_tokens=256)
    chat.set_defaults(run=_cmd_chat)

    export = commands.add_parser("export-hf", help="write a transformers Llama (or Qwen3, with QK-norm) directory")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--out", required=True)
    export.add_argument("--tokenizer", default=None)
    export.set_defaults(run=_cmd_export_hf)

    imp = commands.add_parser("import-hf", help="turn a Llama or Qwen3 HF directory into a checkpoint")
    imp.add_argument("hf_dir")
    imp.add_argument("--out", required=True)
    imp.set_defaults(run=_cmd_import_hf)

    mm_in = commands.add_parser(
        "import-minimind",
        help="turn MiniMind's weights (a .pth of its trainers, or a Transformers-MiniMind directory) into a checkpoint",
    )
    mm_in.add_argument("pth", nargs="?", help="MiniMind .pth (e.g. full_sft_768.pth or its *_resume.pth)")
    mm_in.add_argument("--preset", help="the .pth's architecture, e.g. minimind-26m, minimind-3 (+ --model.* fields)")
    mm_in.add_argument("--from-hf", help="a Transformers-MiniMind directory (model_type minimind) instead of a .pth")
    mm_in.add_argument("--out", required=True)
    mm_in.set_defaults(run=_cmd_import_minimind)

    mm_out = commands.add_parser("export-minimind", help="write a checkpoint as a .pth that MiniMind's scripts load")
    mm_out.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    mm_out.add_argument("--out", required=True, help="the .pth file")
    mm_out.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                        help="float16 as MiniMind's trainers write; float32 round-trips exactly")  # fmt: skip
    mm_out.set_defaults(run=_cmd_export_minimind)

    merge = commands.add_parser(
        "consolidate", help="write the fp32 model.safetensors of a DeepSpeed ZeRO checkpoint (or run) from its shards"
    )
    merge.add_argument("checkpoint", help="checkpoint or run directory (its newest checkpoint)")
    merge.add_argument("--out", help="write the consolidated checkpoint here (default: into the checkpoint)")
    merge.set_defaults(run=_cmd_consolidate)

    tok = commands.add_parser("train-tokenizer", help="train the byte-level BPE tokenizer on jsonl files")
    tok.add_argument("files", nargs="+")
    tok.add_argument("--out", required=True)
    tok.add_argument("--vocab-size", type=int, default=6400)
    tok.add_argument(
        "--sample-mb",
        type=float,
        default=None,
        help="train on about this many MB of lines spread over the files (default: all)",
    )
    tok.set_defaults(run=_cmd_train_tokenizer)

    from minimind.data.pipeline.cli import add_prepare_arguments

    prep = commands.add_parser("prepare", help="shard, validate, tokenize and pack jsonl into Parquet (Ray Data)")
    add_prepare_arguments(prep)
    prep.set_defaults(run=_cmd_prepare)

    check = commands.add_parser(
        "check-cluster", help="check ray up files and KubeRay RayJobs offline with Ray's own autoscaler code"
    )
    check.add_argument("files", nargs="+")
    check.set_defaults(run=_cmd_check_cluster)
    return parser


def _info_overrides(argv: list[str]) -> list[str]:
    """``info --config R --a.b V ...``'s overrides: what follows ``info`` but ``--config R``."""
    tokens = argv[argv.index("info") + 1 :]
    if "--config" in tokens:
        at = tokens.index("--config")
        return tokens[:at] + tokens[at + 2 :]
    return [token for token in tokens if not token.startswith("--config=")]


def main(argv: list[str] | None = None) -> None:
    from minimind.config import ConfigError, parse_override_args
    from minimind.cuda import DeviceError

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parser.parse_known_args(argv)
    if args.command == "info" and args.config and args.preset:  # the preset slot took an override's value
        rest, args.preset = _info_overrides(argv), None
    try:
        takes_overrides = ("train", "info", "import-minimind")
        overrides = parse_override_args(rest) if args.command in takes_overrides else {}
        if rest and args.command not in takes_overrides:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.run(args, overrides)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except DeviceError as error:
        print(f"device error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
