"""The Ray Data corpus pipeline: jsonl -> validated, tokenized, packed Parquet shards + manifest.

Stages (every Ray touchpoint is in this file):

1. plan: inputs are cut into newline-aligned byte ranges; Ray tasks count each range's lines so
   every record keeps its exact ``file:line``;
2. validate (Ray tasks, ``map_batches`` over ranges): each range is streamed line by line, parsed,
   checked against the format and the quality filters, and assigned to train/val by a hash of the
   record (stable as the corpus grows);
3. tokenize and write (an actor pool, ``compute=ActorPoolStrategy``): each batch of rows is
   deduplicated (optional), tokenized through the stage formats, packed (pretrain) or masked
   (sft/dpo/r1), shuffled with a seed derived from its first row, and written as one Parquet
   shard per split (read by Ray Data) plus the same rows as memory-mapped token arrays (read by
   training, :mod:`minimind.data.token_store`); rejected rows go to ``rejects/`` with file, line
   and reason. Each batch returns only its statistics, so the driver's memory does not grow with
   the corpus.

The run builds everything in a temporary folder next to ``out`` and renames it into place with its
``manifest.json`` last, so an interrupted run leaves no half-written output behind, and a finished
one is reused when inputs, tokenizer and options are unchanged. Inputs and ``out`` may be object
storage URIs (``s3://``...): there the actors upload each shard as they write it and the manifest,
uploaded last, marks the corpus complete; training copies it once per node (:mod:`minimind.storage`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from minimind import storage
from minimind.data.formats import RecordError, encode_record
from minimind.data.formats.pretrain import pack_documents
from minimind.data.formats.records import in_validation_split
from minimind.data.pipeline.chunks import (
    Chunk,
    file_identity,
    lines_starting_in,
    number_chunks,
    plan_chunks,
    read_lines,
    resolve_inputs,
)
from minimind.data.pipeline.manifest import SCHEMA_VERSION, SHARD_COLUMNS, Manifest, is_prepared
from minimind.data.pipeline.validate import Filters, detect_format, validate_line
from minimind.data.token_store import token_dtype, write_token_store
from minimind.tokenizer import load_tokenizer


@dataclass
class PrepareOptions:
    inputs: list[str]
    out: str
    format: str | None = None
    """pretrain|sft|dpo|r1; None detects it from the first valid records."""
    tokenizer: str | None = None
    seq_len: int = 512
    val_fraction: float = 0.01
    strict: bool = False
    filters: Filters = field(default_factory=Filters)
    chunk_bytes: int = 32 << 20
    rows_per_shard: int = 8192
    actors: int = 1
    tokenizer_threads: int = 1
    seed: int = 0


# -- stage 2: validation (Ray tasks) ---------------------------------------------------------------


def _validate_chunks(
    batch: dict[str, np.ndarray], fmt: str, filters: Filters, val_fraction: float, strict: bool
) -> dict[str, list]:
    out: dict[str, list] = {
        k: [] for k in ("chunk", "source", "line", "split", "record", "digest", "reason", "field", "detail", "bytes")
    }
    for index in range(len(batch["path"])):
        chunk = Chunk(
            str(batch["path"][index]),
            int(batch["start"][index]),
            int(batch["end"][index]),
            int(batch["first_line"][index]),
            int(batch["index"][index]),
        )
        for line, raw in read_lines(chunk):
            if not raw.strip():
                continue
            out["chunk"].append(chunk.index)
            out["source"].append(chunk.path)
            out["line"].append(line)
            out["bytes"].append(len(raw) + 1)
            try:
                record, digest = validate_line(raw, fmt, filters)
            except RecordError as error:
                out["split"].append("")
                out["record"].append("")
                out["digest"].append("")
                out["reason"].append(error.reason)
                out["field"].append(error.field_name or "")
                out["detail"].append(error.detail)
                if strict:
                    break  # the driver raises this row; nothing after it in the chunk matters
                continue
            out["split"].append("val" if in_validation_split(record, val_fraction) else "train")
            out["record"].append(json.dumps(record, ensure_ascii=False))
            out["digest"].append(digest)
            out["reason"].append("")
            out["field"].append("")
            out["detail"].append("")
    return out


def _reject(source: str, line: int, reason: str, field_name: str, detail: str) -> dict:
    error = RecordError(reason, detail, field_name or None, source, line)
    return {
        "source": source,
        "line": line,
        "reason": reason,
        "field": field_name,
        "detail": detail,
        "message": str(error),
    }


# -- stage 3: tokenize, pack and write (actor pool) ------------------------------------------------


@ray.remote(num_cpus=0)
class DedupRegistry:
    """Content hashes seen so far across all writers (exact-duplicate removal)."""

    def __init__(self):
        self.seen: set[str] = set()

    def first_seen(self, digests: list[str]) -> list[bool]:
        fresh = []
        for digest in digests:
            fresh.append(digest not in self.seen)
            self.seen.add(digest)
        return fresh


class ShardWriter:
    """Tokenizes one batch of validated rows and writes its train/val shards and rejects."""

    def __init__(self, options: PrepareOptions, fmt: str, work_dir: str, registry=None):
        self.options, self.fmt, self.registry = options, fmt, registry
        self.tokenizer = load_tokenizer(options.tokenizer)
        # Object storage: each shard is written on this node, then uploaded and deleted here.
        self.destination = work_dir if storage.is_uri(work_dir) else None
        self.work_dir = Path(tempfile.mkdtemp(prefix="minimind-shards-")) if self.destination else Path(work_dir)

    def _publish(self, local: Path) -> None:
        """Upload every file of the shard or rejects file ``local`` (its arrays share its stem)."""
        if self.destination is None:
            return
        stem = local.name.removesuffix(".parquet").removesuffix(".jsonl")
        for file in sorted(local.parent.glob(f"{stem}.*")):
            relative = file.relative_to(self.work_dir).as_posix()
            storage.upload(file, storage.join(self.destination, relative))
            file.unlink()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        options = self.options
        rows = len(batch["line"])
        key = f"{int(batch['chunk'][0]):05d}-{int(batch['line'][0]):010d}"
        rejects = [
            _reject(
                str(batch["source"][i]),
                int(batch["line"][i]),
                str(batch["reason"][i]),
                str(batch["field"][i]),
                str(batch["detail"][i]),
            )
            for i in range(rows)
            if batch["reason"][i]
        ]
        valid = [i for i in range(rows) if not batch["reason"][i]]
        duplicates = 0
        if self.registry is not None and valid:
            fresh = ray.get(self.registry.first_seen.remote([str(batch["digest"][i]) for i in valid]))
            duplicates = len(valid) - sum(fresh)
            valid = [i for i, keep in zip(valid, fresh) if keep]
        encoded: dict[str, list] = {"train": [], "val": []}
        if self.fmt == "pretrain":
            # Documents cannot fail to encode; one batched call is much faster than one per record.
            texts = [json.loads(batch["record"][i])["text"] for i in valid]
            for i, ids in zip(valid, self.tokenizer.encode_batch(texts)):
                encoded[str(batch["split"][i])].append(ids + [self.tokenizer.eos_id])
            valid = []
        for i in valid:
            try:
                example = encode_record(self.fmt, json.loads(batch["record"][i]), self.tokenizer, options.seq_len)
            except RecordError as error:
                source, line = str(batch["source"][i]), int(batch["line"][i])
                rejects.append(_reject(source, line, error.reason, error.field_name or "", error.detail))
                continue
            encoded[str(batch["split"][i])].append(example)
        stats = {
            "rows_in": rows,
            "bytes_in": int(np.sum(batch["bytes"])),
            "duplicates": duplicates,
            "rejects": json.dumps(Counter(r["reason"] for r in rejects)),
            "shards": [],
            "records_out": 0,
            # Strict mode: the driver stops the run at this row.
            "first_reject": json.dumps(min(rejects, key=lambda r: (r["source"], r["line"]))) if rejects else "",
        }
        totals = {"train": [0, 0, 0], "val": [0, 0, 0]}  # rows, tokens, padded tokens
        for split, examples in encoded.items():
            if not examples:
                continue
            stats["records_out"] += len(examples)
            if self.fmt == "pretrain":
                examples = list(pack_documents(examples, options.seq_len))
            # Deterministic shuffle: the seed comes from the shard's first row, not from timing.
            random.Random(f"{options.seed}-{key}-{split}").shuffle(examples)
            table = _to_table(self.fmt, examples)
            path = self.work_dir / split / f"part-{key}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path, compression="zstd")
            write_token_store(path, self.fmt, examples, token_dtype(self.tokenizer.vocab_size))
            self._publish(path)
            tokens = sum(_tokens(self.fmt, e) for e in examples)
            slots = len(examples) * options.seq_len * (2 if self.fmt == "dpo" else 1)
            totals[split] = [len(examples), tokens, slots]
            stats["shards"].append(
                json.dumps({"split": split, "path": f"{split}/{path.name}", "rows": len(examples), "tokens": tokens})
            )
        if rejects:
            reject_path = self.work_dir / "rejects" / f"part-{key}.jsonl"
            reject_path.parent.mkdir(parents=True, exist_ok=True)
            with open(reject_path, "w", encoding="utf-8") as handle:
                for reject in rejects:
                    handle.write(json.dumps(reject, ensure_ascii=False) + "\n")
            self._publish(reject_path)
        for split in ("train", "val"):
            stats[f"{split}_rows"], stats[f"{split}_tokens"], stats[f"{split}_slots"] = totals[split]
        if self.destination is not None:
            # Everything is uploaded: leave no folders behind on this node (the next batch makes them again).
            shutil.rmtree(self.work_dir, ignore_errors=True)
        return {name: [value] for name, value in stats.items()}


def _tokens(fmt: str, example: dict) -> int:
    if fmt == "dpo":
        return len(example["chosen_ids"]) + len(example["rejected_ids"])
    return len(example["input_ids"])


def _to_table(fmt: str, examples: list[dict]) -> pa.Table:
    columns = SHARD_COLUMNS[fmt]
    return pa.table({name: pa.array([e[name] for e in examples], type=pa.list_(pa.int32())) for name in columns})


# -- driver ----------------------------------------------------------------------------------------


def _detect(files: list[str]) -> str:
    chunk = Chunk(files[0], 0, 1 << 20)
    for _, raw in read_lines(chunk):
        try:
            fmt = detect_format(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if fmt:
            return fmt
    raise ValueError(f"could not detect the format from the first MiB of {files[0]}; pass --format")


def _fingerprint(options: PrepareOptions, fmt: str, tokenizer_hash: str, files: list[str]) -> str:
    described = {
        "schema": SCHEMA_VERSION,
        "format": fmt,
        "tokenizer": tokenizer_hash,
        "seq_len": options.seq_len,
        "val_fraction": options.val_fraction,
        "filters": asdict(options.filters),
        "seed": options.seed,
        "rows_per_shard": options.rows_per_shard,
        "inputs": [file_identity(f) for f in files],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


@ray.remote(num_cpus=0.5)
def _count_lines(path: str, start: int, end: int) -> int:
    return lines_starting_in(path, start, end)


def prepare(options: PrepareOptions) -> Manifest:
    """Run the pipeline (or reuse a finished identical run) and return its manifest."""
    files = resolve_inputs(options.inputs)
    fmt = options.format or _detect(files)
    tokenizer = load_tokenizer(options.tokenizer)
    fingerprint = _fingerprint(options, fmt, tokenizer.fingerprint, files)
    out = options.out.rstrip("/")
    remote = storage.is_uri(out)
    if is_prepared(out):
        existing = Manifest.load(out)
        if existing.fingerprint == fingerprint:
            print(f"[prepare] {out} is up to date (fingerprint {fingerprint}); reusing it", flush=True)
            return existing
    started = time.perf_counter()
    ranges = plan_chunks(files, options.chunk_bytes)
    counts = ray.get([_count_lines.remote(*r) for r in ranges])
    chunks = number_chunks(ranges, counts)
    if remote:
        # Object storage has no rename: shards go to their place directly and manifest.json, written last,
        # marks the corpus complete (a corpus without one is never read, and the next run starts over).
        work_dir = out
        storage.delete_dir(out)
    else:
        work_dir = str(Path(out).parent / f".{Path(out).name}.tmp-{os.getpid()}")
        shutil.rmtree(work_dir, ignore_errors=True)
        Path(work_dir).mkdir(parents=True)
    registry = DedupRegistry.remote() if options.filters.dedup else None
    cpus = int(ray.cluster_resources().get("CPU", 1))
    # Small machines get half-CPU actors; either way one CPU stays free for the read/validate tasks,
    # since an actor pool holding every CPU starves them (a hang, not an error).
    actor_cpus = 0.5 if cpus <= 2 else 1.0
    actors = max(1, min(options.actors, int((cpus - 1) / actor_cpus)))
    env = {"RAYON_NUM_THREADS": str(options.tokenizer_threads), "TOKENIZERS_PARALLELISM": "true"}
    validated = ray.data.from_items([c.to_row() for c in chunks], override_num_blocks=len(chunks)).map_batches(
        _validate_chunks,
        fn_kwargs={
            "fmt": fmt,
            "filters": options.filters,
            "val_fraction": options.val_fraction,
            "strict": options.strict,
        },
        batch_size=1,
        num_cpus=0.5,
    )
    written = validated.map_batches(
        ShardWriter,
        fn_constructor_args=(options, fmt, str(work_dir), registry),
        batch_size=options.rows_per_shard,
        # One actor at first, more as CPUs are free: a fixed-size pool on a partly busy cluster can hold the
        # CPUs the validate tasks need (a hang).
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        num_cpus=actor_cpus,
        runtime_env={"env_vars": env},
    )
    stats = []
    try:
        for row in written.iter_rows():
            if options.strict and row["first_reject"]:
                # Strict mode: stop the pipeline at the first bad row met and name it.
                bad = json.loads(row["first_reject"])
                raise RecordError(bad["reason"], bad["detail"], bad["field"] or None, bad["source"], bad["line"])
            stats.append(row)
    except BaseException:
        storage.delete_dir(work_dir)  # the partial output, local or in object storage
        raise
    manifest = Manifest.from_stats(
        stats,
        fmt=fmt,
        seq_len=options.seq_len,
        tokenizer_hash=tokenizer.fingerprint,
        fingerprint=fingerprint,
        inputs=files,
        options=options,
        seconds=time.perf_counter() - started,
        token_dtype=str(token_dtype(tokenizer.vocab_size)),
    )
    manifest.write(work_dir)
    if not remote:
        if Path(out).exists():
            shutil.rmtree(out)
        os.replace(work_dir, out)
    manifest.root = out
    return manifest
