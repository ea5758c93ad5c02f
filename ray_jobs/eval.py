"""Evaluate a checkpoint (or Hugging Face export) on a validation set, spread over Ray.

    python ray_jobs/eval.py --checkpoint runs/sample/sft --data data/sample/sft.jsonl --format sft --out runs/eval
    ray job submit --working-dir . -- python ray_jobs/eval.py --checkpoint ... --data s3://bucket/val.jsonl ...

Writes eval.json and eval.md to --out: perplexity and bits per byte (or, for DPO pairs with
--reference, reward accuracy and margin), the continuation score, chat-format adherence for chat
formats, and samples for MiniMind's prompts. Connects to RAY_ADDRESS when set, else starts Ray locally.
Scoring actors run on CPUs unless --use-gpu; the driver's part runs on --device (auto: a GPU when present).
"""

from __future__ import annotations

import argparse
import itertools
import sys

import ray

from minimind.config import ConfigError
from minimind.cuda import DeviceError
from minimind.data.formats import FORMATS, RecordError, encode_record, iter_jsonl
from minimind.data.formats.pretrain import pack_documents
from minimind.data.pipeline import Manifest, is_prepared
from minimind.data.token_store import TokenStore
from minimind.devices import select_device
from minimind.eval.distributed import ScoringJob, score_files
from minimind.eval.metrics import chat_adherence, continuation_score
from minimind.eval.report import write_report
from minimind.eval.samples import CHAT_PROMPTS, CONTINUATION_PROMPTS, generate_samples
from minimind.model.hf import load_for_inference
from minimind.tokenizer import load_tokenizer


def leading_documents(files: list[str], fmt: str, tokenizer, seq_len: int, count: int) -> list[list[int]]:
    """Token ids of the first ``count`` usable records (packed blocks for pretrain) for the continuation score."""
    if len(files) == 1 and is_prepared(files[0]):
        rows = TokenStore(Manifest.load(files[0]), "val")  # memory-mapped: only the rows used are read
        return [rows[i]["input_ids"].tolist() for i in range(min(count, len(rows)))]
    encoded = []
    lines = itertools.chain.from_iterable(iter_jsonl(path) for path in files)
    for _, record in itertools.islice(lines, count * 4):
        if isinstance(record, RecordError):
            continue
        try:
            encoded.append(encode_record(fmt, record, tokenizer, seq_len))
        except RecordError:
            continue
    if fmt == "pretrain":
        return [block["input_ids"] for block in pack_documents(encoded, seq_len)][:count]
    return [example["input_ids"] for example in encoded][:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint, run or Hugging Face export directory")
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="validation jsonl files (local or pyarrow URIs), or a prepared corpus (its val split)",
    )
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--adapter", default=None, help="LoRA checkpoint to apply")
    parser.add_argument("--reference", default=None, help="DPO: the reference model for implicit rewards")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument(
        "--actors", type=int, default=4, help="scoring actors (CPU actors: capped at the cluster's CPUs - 1)"
    )
    parser.add_argument(
        "--use-gpu",
        action="store_true",
        help="each scoring actor asks Ray for a GPU (--gpus-per-actor) and scores on it; refused on a cluster "
        "that has and can get no GPU",
    )
    parser.add_argument(
        "--gpus-per-actor", type=float, default=1.0, help="with --use-gpu: GPU share per actor (0.25: four per GPU)"
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="where the driver runs the continuation score, chat adherence and samples: auto (a GPU when this "
        "process sees one), cpu, cuda or cuda:N",
    )
    parser.add_argument("--continuation-docs", type=int, default=16)
    parser.add_argument("--prefix-tokens", type=int, default=32)
    parser.add_argument("--continuation-tokens", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.format == "dpo" and not args.reference:
        parser.error("--format dpo needs --reference (the model the implicit reward compares against)")

    if args.use_gpu and args.gpus_per_actor <= 0:
        parser.error("--gpus-per-actor must be positive")
    try:
        device = select_device(args.device)  # before any scoring: a GPU asked for here must be usable
        ray.init(ignore_reinit_error=True)
        job = ScoringJob(
            args.checkpoint,
            args.format,
            args.seq_len,
            args.tokenizer,
            args.adapter,
            args.reference,
            args.beta,
            device="cuda" if args.use_gpu else "cpu",
        )
        metrics = score_files(args.data, job, args.actors, gpus_per_actor=args.gpus_per_actor if args.use_gpu else None)
    except (ConfigError, DeviceError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None

    tokenizer = load_tokenizer(args.tokenizer)
    model = load_for_inference(args.checkpoint, device, args.adapter)
    if args.format != "dpo" and args.continuation_docs:
        documents = leading_documents(args.data, args.format, tokenizer, args.seq_len, args.continuation_docs * 4)
        metrics.update(
            continuation_score(model, documents, args.prefix_tokens, args.continuation_tokens, args.continuation_docs)
        )
    chat = args.format != "pretrain"
    if chat:
        metrics.update(chat_adherence(model, tokenizer, CHAT_PROMPTS, args.max_new_tokens))
    samples = generate_samples(
        model,
        tokenizer,
        CHAT_PROMPTS if chat else CONTINUATION_PROMPTS,
        chat=chat,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        temperature=0.7,
        repetition_penalty=1.2,
    )
    result = {
        "checkpoint": args.checkpoint,
        "data": args.data,
        "format": args.format,
        "metrics": metrics,
        "samples": samples,
    }
    json_path, md_path = write_report(args.out, result)
    print(open(md_path, encoding="utf-8").read())
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
