"""Checkpoint evaluation spread over a Ray cluster (the Ray side of ``ray_jobs/eval.py``).

Validation jsonl is streamed with ``ray.data.read_text`` (one row per line, so records of any
shape survive and nothing is loaded whole), and scored by a pool of actors that each load the
model once. Every actor returns sums (NLL, tokens, bytes; or DPO wins and margins) and reject
counts per batch of lines; the driver adds them up, so the result does not depend on how the
lines were spread. Multiple-choice questions (``score_choices``) go to actors of the same kind, which return
each question's record. The continuation score, chat adherence and samples need few documents and run
on the driver. Actors run on CPUs by default; with ``gpus_per_actor`` each asks Ray for that share of a GPU and
scores on it (the autoscaler adds GPU nodes for them; a cluster that has and can get no GPU is refused).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import numpy as np
import ray
import torch

from minimind.capacity import ClusterLimits, cluster_limits, max_trials, on_kuberay, present_trials
from minimind.config import ConfigError
from minimind.data.dataset import collate
from minimind.data.formats import RecordError, encode_record
from minimind.data.formats.pretrain import pack_documents
from minimind.data.formats.records import parse_line
from minimind.data.pipeline import Manifest, is_prepared
from minimind.data.pipeline.manifest import as_examples
from minimind.devices import select_device
from minimind.eval.evaluator import token_byte_lengths
from minimind.eval.metrics import perplexity_from_sums, perplexity_sums, preference_from_sums, preference_sums
from minimind.model.hf import load_for_inference
from minimind.tokenizer import load_tokenizer


@dataclass
class ScoringJob:
    """What every scoring actor needs to rebuild the model and encode lines."""

    checkpoint: str
    data_format: str
    seq_len: int
    tokenizer: str | None = None
    adapter: str | None = None
    reference: str | None = None
    """DPO only: the frozen reference model the implicit reward is measured against."""
    beta: float = 0.1
    batch_size: int = 8
    device: str = "cpu"
    """Where each actor scores: ``cpu``, or ``cuda`` for actors that hold a GPU (``--use-gpu``)."""


class ShardScorer:
    """Ray Data actor: encodes a batch of jsonl lines and returns the batch's metric sums."""

    def __init__(self, job: ScoringJob):
        torch.set_num_threads(1)  # one core per actor; the pool size sets the parallelism
        self.job = job
        self.device = select_device(job.device, "--use-gpu: a scoring actor's device")  # fails here, saying why
        self.tokenizer = load_tokenizer(job.tokenizer)
        self.model = load_for_inference(job.checkpoint, self.device, job.adapter)
        self.reference = load_for_inference(job.reference, self.device) if job.reference else None
        self.token_bytes = token_byte_lengths(self.tokenizer)

    def _encode(self, lines) -> tuple[list, Counter]:
        encoded, rejects = [], Counter()
        for line in lines:
            if not line.strip():
                continue
            try:
                record = parse_line(line.encode("utf-8"))
                encoded.append(encode_record(self.job.data_format, record, self.tokenizer, self.job.seq_len))
            except RecordError as error:
                rejects[error.reason] += 1
        if self.job.data_format == "pretrain":
            encoded = list(pack_documents(encoded, self.job.seq_len))
        return encoded, rejects

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "text" in batch:  # raw jsonl lines
            examples, rejects = self._encode(batch["text"])
        else:  # rows of a prepared corpus, already tokenized
            columns = list(batch)
            rows = [{c: batch[c][i].tolist() for c in columns} for i in range(len(batch[columns[0]]))]
            examples = as_examples(self.job.data_format, rows)
            rejects = Counter()
        size, pad = self.job.batch_size, self.tokenizer.pad_id
        batches = [
            {key: value.to(self.device) for key, value in collate(examples[start : start + size], pad).items()}
            for start in range(0, len(examples), size)
        ]
        if self.reference is not None:
            sums = preference_sums(self.model, self.reference, batches, self.job.beta)
        else:
            sums = perplexity_sums(self.model, batches, self.token_bytes)
        return {"sums": np.array([sums], dtype=np.float64), "rejects": np.array([json.dumps(rejects)])}


def actor_pool_size(
    requested: int,
    nodes: list[dict[str, float]],
    limits: ClusterLimits | None = None,
    gpus_per_actor: float | None = None,
    kuberay: bool = False,
) -> int:
    """Scoring actors to start. CPU actors: at most the cluster's CPUs - 1, leaving one for the read tasks (an
    actor pool holding every CPU starves them: a hang). GPU actors: at most what the nodes up now or the
    autoscaler's limits fit (KubeRay's cannot be read: as many as asked); none fitting is refused, naming
    ``--use-gpu``."""
    if gpus_per_actor is None:
        cpus = int(sum(node.get("CPU", 0.0) for node in nodes)) or 1
        return max(1, min(requested, cpus - 1))
    per_actor = {"CPU": 1.0, "GPU": gpus_per_actor}
    most = max_trials(limits, per_actor, 1) if limits is not None else (requested if kuberay else 0)
    fit = max(present_trials(nodes, per_actor, 1), requested if most is None else most)
    if fit == 0:
        scale = f"nor can its autoscaler add one ({limits.source})" if limits else "and it does not autoscale"
        raise ConfigError(
            f"--use-gpu: no node of this Ray cluster has {gpus_per_actor:g} GPU and 1 CPU for a scoring actor, "
            f"{scale}; evaluate without --use-gpu, or on a cluster with GPUs"
        )
    return max(1, min(requested, fit))


def actor_pool(num_actors: int, gpus_per_actor: float | None) -> dict:
    """``map_batches``' arguments for a pool of scoring actors sized by ``actor_pool_size`` on this cluster."""
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    limits = cluster_limits() if gpus_per_actor else None
    actors = actor_pool_size(num_actors, nodes, limits, gpus_per_actor, kuberay=on_kuberay())
    gpus = {"num_gpus": gpus_per_actor} if gpus_per_actor else {}
    # The pool starts with one actor and grows to ``actors`` as CPUs are free: a fixed-size pool on a cluster
    # where something else holds a CPU (another job, a run's workers still stopping) takes the CPUs its read
    # tasks need, and waits for them for ever.
    return {"compute": ray.data.ActorPoolStrategy(min_size=1, max_size=actors), "num_cpus": 1, **gpus}


def score_files(
    files: list[str], job: ScoringJob, num_actors: int, lines_per_batch: int = 256, gpus_per_actor: float | None = None
) -> dict:
    """Perplexity/bits per byte (or DPO reward accuracy/margin) of ``files``, over Ray.

    ``files`` are jsonl files, or a single prepared corpus directory whose ``val`` split is scored
    (its tokenizer and seq len are checked first). ``gpus_per_actor``: each actor asks for that share of a GPU
    and scores on it (``job.device`` is then ``cuda``).
    """
    if len(files) == 1 and is_prepared(files[0]):
        manifest = Manifest.load(files[0])
        manifest.check(load_tokenizer(job.tokenizer).fingerprint, job.seq_len, job.data_format)
        rows = manifest.ray_dataset("val")
    else:
        rows = ray.data.read_text(files)
    scored = rows.map_batches(
        ShardScorer,
        fn_constructor_args=(job,),
        batch_size=lines_per_batch,
        batch_format="numpy",
        **actor_pool(num_actors, gpus_per_actor),
    )
    totals = np.zeros(3)
    rejects: Counter = Counter()
    for row in scored.iter_rows():
        totals += row["sums"]
        rejects.update(json.loads(row["rejects"]))
    try:
        if job.reference is not None:
            metrics = {**preference_from_sums(*totals), "pairs": int(totals[2])}
        else:
            metrics = perplexity_from_sums(*totals)
    except ValueError as error:
        raise ValueError(f"{error} in {files}; rejected records: {dict(rejects)}") from None
    metrics["rejected_records"] = dict(rejects)
    return metrics


class ChoiceScorer(ShardScorer):
    """Ray Data actor: scores a batch of multiple-choice questions (``minimind.eval.choices``); it loads the
    model as ``ShardScorer`` does (given a job without a DPO reference)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from minimind.eval.choices import Question, score_question

        records = []
        for item in batch["item"]:
            task = json.loads(item)
            question, shots = Question(**task["question"]), [Question(**s) for s in task["shots"]]
            record = score_question(self.model, self.tokenizer, question, shots, self.job.seq_len)
            records.append(json.dumps({"index": task["index"], **record}, ensure_ascii=False))
        return {"record": np.array(records)}


def score_choices(
    questions: list, shots: dict, job: ScoringJob, num_actors: int, gpus_per_actor: float | None = None
) -> list[dict]:
    """Every question's record (``choices.score_question``), in the order of ``questions``, scored over Ray;
    ``shots`` maps a subject to the solved questions put before each of its questions."""
    from dataclasses import asdict, replace

    items = [
        {"item": json.dumps({"index": i, "question": asdict(q), "shots": [asdict(s) for s in shots.get(q.subject, [])]},
                            ensure_ascii=False)}
        for i, q in enumerate(questions)
    ]  # fmt: skip
    scored = ray.data.from_items(items).map_batches(
        ChoiceScorer,
        fn_constructor_args=(replace(job, reference=None),),
        batch_size=16,
        batch_format="numpy",
        **actor_pool(num_actors, gpus_per_actor),
    )
    records = [json.loads(row["record"]) for row in scored.iter_rows()]
    return [{k: v for k, v in r.items() if k != "index"} for r in sorted(records, key=lambda r: r["index"])]
