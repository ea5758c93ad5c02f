"""Evaluate a checkpoint (or Hugging Face export) on a validation set, spread over Ray.

    python ray_jobs/eval.py --checkpoint runs/experiments/sample/sft --data data/sample/sft.jsonl --format sft \
        --out runs/eval
    python ray_jobs/eval.py --checkpoint C --choices ceval/val/*.csv --dev ceval/dev/*.csv --shots 5 --out runs/ceval
    ray job submit --working-dir . -- python ray_jobs/eval.py --checkpoint ... --data s3://bucket/val.jsonl ...

Writes eval.json and eval.md to --out: perplexity and bits per byte (or, for DPO pairs with
--reference, reward accuracy and margin), the continuation score, chat-format adherence for chat
formats, and samples for MiniMind's prompts; with --choices, multiple-choice accuracy overall and per subject
(C-Eval/CMMLU CSV or jsonl, each option scored by its log-likelihood; minimind/eval/choices.py), with
each question's scores in choices.jsonl; --contamination CORPUS... marks the questions found in training
corpora (minimind/eval/contamination.py). Connects to RAY_ADDRESS when set, else starts Ray locally.
Scoring actors run on CPUs unless --use-gpu; the driver's part runs on --device (auto: a GPU when present).
"""

from __future__ import annotations

import argparse
import sys

import ray

from minimind import storage
from minimind.config import ConfigError
from minimind.cuda import DeviceError
from minimind.data.formats import FORMATS
from minimind.eval.job import EvalOptions, run_eval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint, run or Hugging Face export directory")
    parser.add_argument(
        "--data",
        nargs="+",
        default=[],
        help="validation jsonl files (local or pyarrow URIs), or a prepared corpus (its val split)",
    )
    parser.add_argument("--format", choices=FORMATS, help="the --data files' format")
    parser.add_argument(
        "--choices",
        nargs="+",
        default=[],
        help="multiple-choice questions: C-Eval/CMMLU CSV files (one per subject) or jsonl "
        '({"question", "choices": [...], "answer": index or letter, "subject"})',
    )
    parser.add_argument("--dev", nargs="+", default=[], help="solved questions to take --shots from, per subject")
    parser.add_argument("--shots", type=int, default=0, help="solved questions of its subject before each question")
    parser.add_argument(
        "--contamination",
        nargs="+",
        default=[],
        metavar="CORPUS",
        help="training corpora (jsonl or prepared) to look for the --choices questions in (13-character windows)",
    )
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
    if not args.data and not args.choices:
        parser.error("give --data (with --format), --choices, or both")
    if args.data and not args.format:
        parser.error("--data needs --format")
    if args.contamination and not args.choices:
        parser.error("--contamination checks the --choices questions against training corpora: give --choices")
    if args.shots < 0 or (args.shots and not args.dev):
        parser.error("--shots takes a count of solved questions from --dev files")
    if args.format == "dpo" and not args.reference:
        parser.error("--format dpo needs --reference (the model the implicit reward compares against)")

    if args.use_gpu and args.gpus_per_actor <= 0:
        parser.error("--gpus-per-actor must be positive")
    options = EvalOptions(**vars(args))
    try:
        ray.init(ignore_reinit_error=True)
        json_path, md_path, _ = run_eval(options)
    except (ConfigError, DeviceError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(storage.read_text(md_path))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
