"""``manifest.json`` of a prepared corpus, and reading prepared shards back.

The manifest records what the shards are (schema version, format, seq len, tokenizer fingerprint,
token dtype), what went in and out (rows, tokens, padding, rejects by reason) and where the shards
are. Loaders check the tokenizer and seq len against the run's config and refuse a mismatch.
Training reads the memory-mapped arrays next to each shard (:mod:`minimind.data.token_store`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from minimind import storage

SCHEMA_VERSION = 2  # 2: memory-mapped token arrays next to each Parquet shard
MANIFEST_FILE = "manifest.json"
SHARD_COLUMNS = {
    "pretrain": ("input_ids", "document_ids"),  # labels are the input ids themselves
    "sft": ("input_ids", "labels"),
    "r1": ("input_ids", "labels"),
    "dpo": ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"),
}


def as_examples(fmt: str, rows: list[dict]) -> list[dict]:
    """Shard rows as training examples: pretrain shards store no labels (they equal the inputs)."""
    if fmt == "pretrain":
        for row in rows:
            row["labels"] = row["input_ids"]
    return rows


@dataclass
class Manifest:
    format: str
    seq_len: int
    tokenizer_hash: str
    fingerprint: str
    inputs: list[str]
    rows_in: int = 0
    records_out: int = 0
    bytes_in: int = 0
    duplicates: int = 0
    rejects: dict[str, int] = field(default_factory=dict)
    splits: dict[str, dict] = field(default_factory=dict)
    """Per split: rows (blocks or records), tokens, padding_fraction, shards [{path, rows, tokens}]."""
    options: dict = field(default_factory=dict)
    seconds: float = 0.0
    token_dtype: str = "uint16"
    """numpy dtype of the shards' token arrays."""
    schema_version: int = SCHEMA_VERSION
    root: str = ""

    @classmethod
    def from_stats(
        cls, stats: list[dict], *, fmt, seq_len, tokenizer_hash, fingerprint, inputs, options, seconds, token_dtype
    ) -> Manifest:
        rejects: Counter = Counter()
        splits = {split: {"rows": 0, "tokens": 0, "slots": 0, "shards": []} for split in ("train", "val")}
        manifest = cls(
            fmt,
            seq_len,
            tokenizer_hash,
            fingerprint,
            inputs,
            seconds=seconds,
            options=json.loads(json.dumps(asdict(options))),
            token_dtype=token_dtype,
        )
        for row in stats:
            manifest.rows_in += int(row["rows_in"])
            manifest.records_out += int(row["records_out"])
            manifest.bytes_in += int(row["bytes_in"])
            manifest.duplicates += int(row["duplicates"])
            rejects.update(json.loads(row["rejects"]))
            for split in splits:
                for name in ("rows", "tokens", "slots"):
                    splits[split][name] += int(row[f"{split}_{name}"])
            for shard in row["shards"]:
                shard = json.loads(shard)
                splits[shard.pop("split")]["shards"].append(shard)
        for split in splits.values():
            split["shards"].sort(key=lambda s: s["path"])
            slots = split.pop("slots")
            split["padding_fraction"] = 1 - split["tokens"] / slots if slots else 0.0
        manifest.rejects = dict(sorted(rejects.items()))
        manifest.splits = splits
        return manifest

    def write(self, directory: str | Path) -> None:
        """Write manifest.json whole (a corpus is complete once it has one), locally or at a URI."""
        data = asdict(self)
        data.pop("root")
        storage.write_text(storage.join(directory, MANIFEST_FILE), json.dumps(data, indent=2, ensure_ascii=False))

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        directory = str(directory).rstrip("/")
        data = json.loads(storage.read_text(storage.join(directory, MANIFEST_FILE)))
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"{directory}/{MANIFEST_FILE}: schema version {data.get('schema_version')} "
                f"is not {SCHEMA_VERSION}; prepare the corpus again"
            )
        return cls(**data, root=str(directory))

    @property
    def rejected(self) -> int:
        return sum(self.rejects.values())

    def check(self, tokenizer_hash: str, seq_len: int, fmt: str | None = None) -> None:
        """Refuse shards made with another tokenizer, a longer seq len, or another format."""
        where = f"{self.root}/{MANIFEST_FILE}"
        if tokenizer_hash != self.tokenizer_hash:
            raise ValueError(
                f"{where}: prepared with tokenizer {self.tokenizer_hash}, but this run uses "
                f"{tokenizer_hash}; prepare the corpus again with this run's tokenizer"
            )
        if seq_len != self.seq_len:
            raise ValueError(f"{where}: prepared for seq_len {self.seq_len}, but this run has data.seq_len={seq_len}")
        if fmt is not None and fmt != self.format and {fmt, self.format} != {"sft", "r1"}:
            raise ValueError(f"{where}: holds {self.format!r} data, but this run reads {fmt!r}")

    def shard_paths(self, split: str) -> list[str]:
        return [storage.join(self.root, shard["path"]) for shard in self.splits.get(split, {}).get("shards", [])]

    def examples(self, split: str) -> list[dict]:
        """All rows of a split from Parquet as dicts of int lists: for tests and small splits only.

        This costs ~50 bytes per token; training memory-maps the token arrays instead
        (:class:`minimind.data.token_store.TokenStore`).
        """
        rows: list[dict] = []
        for path in self.shard_paths(split):
            rows.extend(read_shard(path).to_pylist())
        return as_examples(self.format, rows)

    def ray_dataset(self, split: str):
        """The split as a Ray Dataset, one read task per shard.

        Not ``ray.data.read_parquet``: Ray Data 2.60 lists a Parquet read's row groups on a pool of footer-reading
        actors started for each read (``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS``, 32 by default), 32 Python processes
        to list shards this manifest names already.
        """
        import ray

        paths = self.shard_paths(split)
        if not paths:
            raise ValueError(f"{self.root}: the {split!r} split has no shards")
        listed = ray.data.from_items([{"path": path} for path in paths], override_num_blocks=len(paths))
        return listed.map_batches(_read_shards, batch_size=1, batch_format="pyarrow")

    def summary(self) -> str:
        megabytes = self.bytes_in / 1e6
        lines = [
            f"format {self.format}, seq_len {self.seq_len}, tokenizer {self.tokenizer_hash}",
            f"{'rows in':<22}{self.rows_in:>14,}",
            f"{'records kept':<22}{self.records_out:>14,}",
            f"{'duplicates removed':<22}{self.duplicates:>14,}",
            f"{'rejected':<22}{self.rejected:>14,}",
        ]
        lines += [f"  {reason:<20}{count:>14,}" for reason, count in self.rejects.items()]
        for split, info in self.splits.items():
            lines.append(
                f"{split + ' rows':<22}{info['rows']:>14,}  tokens {info['tokens']:,}  "
                f"padding {info['padding_fraction']:.1%}  shards {len(info['shards'])}"
            )
        rate = megabytes / self.seconds if self.seconds else 0.0
        lines.append(f"{'input':<22}{megabytes:>13.1f}M  in {self.seconds:.1f}s = {rate:.2f} MB/s")
        return "\n".join(lines)


def is_prepared(path: str | Path) -> bool:
    """Whether ``path`` (local or a URI) is a directory written by the prepare pipeline."""
    return storage.is_file(storage.join(path, MANIFEST_FILE))


def local_corpus(path: str | Path) -> str:
    """A prepared corpus to memory-map: ``path`` itself, or for a URI this node's cached copy of it."""
    if not storage.is_uri(path):
        return str(path)
    manifest = Manifest.load(path)
    return str(storage.cached_copy(str(path), manifest.fingerprint))


def read_shard(path: str) -> pa.Table:
    """One Parquet shard, local or in object storage."""
    filesystem, inner = storage.filesystem(path)
    return pq.read_table(inner, filesystem=filesystem)


def _read_shards(batch: pa.Table) -> pa.Table:
    """The shards named in ``batch``'s ``path`` column, as one table."""
    return pa.concat_tables([read_shard(path) for path in batch.column("path").to_pylist()])
