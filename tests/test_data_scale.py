"""Training reads prepared corpora lazily: memory-mapped rows, numpy sampling, mixtures, bounded validation."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE, tiny_config

from minimind.data.dataset import build_training_data, collate, example_length, validation_limit
from minimind.data.jsonl import load_examples, split_examples
from minimind.data.pipeline import Manifest
from minimind.data.pipeline.prepare import PrepareOptions, prepare
from minimind.data.sampler import BatchSampler, Mixture
from minimind.data.token_store import TokenStore, write_token_store

SEQ_LEN = 256
SUBSETS = {"pretrain": ("pretrain.jsonl", 400), "sft": ("sft.jsonl", 400), "dpo": ("dpo.jsonl", 120)}


def subset(directory, fmt):
    name, lines = SUBSETS[fmt]
    path = directory / name
    path.write_text("\n".join((SAMPLE / name).read_text(encoding="utf-8").splitlines()[:lines]) + "\n")
    return path


@pytest.fixture(scope="module")
def corpora(ray_address, tmp_path_factory):
    """Subsets of the bundled samples prepared in several shards each: {format: (jsonl file, manifest)}."""
    directory = tmp_path_factory.mktemp("scale")
    prepared = {}
    for fmt in SUBSETS:
        path = subset(directory, fmt)
        options = PrepareOptions(
            inputs=[str(path)], out=str(directory / fmt), seq_len=SEQ_LEN, val_fraction=0.1, rows_per_shard=64
        )
        prepared[fmt] = (path, prepare(options))
    return prepared


def as_lists(example):
    return {key: np.asarray(value).tolist() for key, value in example.items()}


@pytest.mark.parametrize("fmt", list(SUBSETS))
def test_memory_mapped_rows_equal_the_parquet_rows(corpora, tokenizer, fmt):
    path, manifest = corpora[fmt]
    assert len(manifest.splits["train"]["shards"]) > 1  # rows are found across shard boundaries
    for split in ("train", "val"):
        parquet = Manifest.load(manifest.root).examples(split)
        store = TokenStore(manifest, split, document_ids=fmt == "pretrain")
        assert len(store) == len(parquet) == manifest.splits[split]["rows"]
        assert [as_lists(store[i]) for i in range(len(store))] == parquet
        assert store.lengths().tolist() == [example_length(row) for row in parquet]
    if fmt != "pretrain":  # the stored pairs and conversations are what in-process encoding gives
        everything = [as_lists(r) for split in ("train", "val") for r in TokenStore(manifest, split)]
        in_process = load_examples([path], fmt, tokenizer, SEQ_LEN).examples
        assert Counter(json.dumps(r, sort_keys=True) for r in everything) == Counter(
            json.dumps(r, sort_keys=True) for r in in_process
        )


def test_a_dpo_pair_round_trips_and_collates(corpora, tokenizer):
    store = TokenStore(corpora["dpo"][1], "train")
    pair = store[len(store) - 1]  # the last row of the last shard
    assert all(value.dtype == np.int64 for value in pair.values())
    prompts = []
    for side in ("chosen", "rejected"):
        ids, labels = pair[f"{side}_ids"], pair[f"{side}_labels"]
        targets = np.flatnonzero(labels >= 0)  # the final reply alone: one run of positions
        assert np.array_equal(targets, np.arange(targets[0], targets[-1] + 1))
        assert np.array_equal(labels[targets], ids[targets])
        prompts.append(ids[: targets[0]].tolist())
    assert prompts[0] == prompts[1]  # both sides of the pair share the prompt
    batch = collate([store[0], pair], tokenizer.pad_id)
    assert batch["input_ids"].shape[0] == 4  # chosen sides, then rejected sides
    assert torch.equal(batch["input_ids"][1, : len(pair["chosen_ids"])], torch.from_numpy(pair["chosen_ids"]))
    assert torch.equal(batch["labels"][3, : len(pair["rejected_ids"])], torch.from_numpy(pair["rejected_labels"]))


def test_labels_that_are_not_a_mask_are_refused(tmp_path):
    example = {"input_ids": [5, 6, 7], "labels": [-100, 6, 8]}
    with pytest.raises(ValueError, match="label 8 at token 2 is neither the token id 7 nor -100"):
        write_token_store(tmp_path / "part.parquet", "sft", [example], np.dtype(np.uint16))


def test_old_prepared_corpora_must_be_prepared_again(corpora, tmp_path):
    data = json.loads((Path(corpora["sft"][1].root) / "manifest.json").read_text(encoding="utf-8"))
    data["schema_version"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="schema version 1 is not 2; prepare the corpus again"):
        Manifest.load(tmp_path)
    # Searched for benchmark questions, a corpus made with another tokenizer would decode to other text.
    from minimind.config import ConfigError
    from minimind.eval.choices import Question
    from minimind.eval.contamination import contaminated

    data.update(schema_version=2, tokenizer_hash="0123456789abcdef")
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    question = Question("s", "一年有几个季节？", ["三", "四"], 1, "a.csv:2")
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: prepared with tokenizer 0123456789abcdef, but its rows"):
        contaminated([question], [str(tmp_path)])


def test_ranks_take_disjoint_equal_batches_of_one_global_order():
    lengths = np.random.default_rng(0).integers(1, 500, size=1000)
    for grouped in (None, lengths):
        whole = list(BatchSampler(1000, 10, seed=7, lengths=grouped).batches(3))
        assert sorted(i for batch in whole for i in batch) == list(range(1000))
        for world in (2, 4):
            ranks = [list(BatchSampler(1000, 10, 7, r, world, grouped).batches(3)) for r in range(world)]
            assert {len(batches) for batches in ranks} == {100 // world}
            taken = [i for batches in ranks for batch in batches for i in batch]
            assert len(taken) == len(set(taken)) == 1000 - 1000 % (10 * world)
            # The same (seed, epoch) gives the same global order whatever the world size.
            interleaved = [ranks[j % world][j // world] for j in range(len(taken) // 10)]
            assert interleaved == whole[: len(taken) // 10]
            assert list(BatchSampler(1000, 10, 7, 1, world, grouped).batches(3, start=5)) == ranks[1][5:]


def test_mixture_draws_exact_shares_and_cycles_upsampled_sources():
    mixture = Mixture(sizes=(100, 30, 7), weights=(1.0, 1.0, 2.0))
    assert mixture.counts == [34, 34, 68]  # of 137 examples per epoch
    drawn = mixture.draw(seed=1, epoch=0)
    small = drawn[drawn < 100]
    assert len(small) == len(set(small.tolist())) == 34  # downsampled: no repeats
    for source, (start, size) in enumerate([(100, 30), (130, 7)]):
        picks = drawn[(drawn >= start) & (drawn < start + size)] - start
        for cycle in range(0, len(picks) - size + 1, size):  # every full cycle is a permutation
            assert sorted(picks[cycle : cycle + size].tolist()) == list(range(size)), source
    assert not np.array_equal(drawn, mixture.draw(seed=1, epoch=1))
    sampler = BatchSampler(137, 8, seed=1, mixture=mixture)
    for epoch in (0, 1):
        indices = np.concatenate([np.array(b) for b in sampler.batches(epoch)])
        per_source = np.bincount(np.searchsorted([100, 130], indices, side="right"))
        assert per_source.tolist() == [34, 34, 68]
        assert sorted(indices.tolist()) == sorted(mixture.draw(1, epoch).tolist())  # the draw, shuffled
    assert list(sampler.batches(1, start=4)) == list(sampler.batches(1))[4:]


def mixture_config(sources, **sections):
    data = {"train_files": [], "mixture": sources, "seq_len": SEQ_LEN}
    data.update(sections.pop("data", {}))
    return tiny_config(data=data, **sections)


def test_a_mixture_of_prepared_pretrain_and_jsonl_sft_trains_together(corpora, tokenizer, tmp_path):
    sft_file = subset(tmp_path, "sft")
    config = mixture_config(
        [{"files": [corpora["pretrain"][1].root], "weight": 3.0}, {"files": [str(sft_file)], "format": "sft"}],
        data={"document_mask": True},
        eval={"val_fraction": 0.1, "max_examples": 8, "continuation_docs": 2},
    )
    data = build_training_data(config, tokenizer)
    blocks = corpora["pretrain"][1].splits["train"]["rows"]
    sft = load_examples([sft_file], "sft", tokenizer, SEQ_LEN, split="train", val_fraction=0.1).examples
    assert len(data.examples) == blocks + len(sft)
    assert data.mixture.sizes == (blocks, len(data.examples) - blocks)
    pretrain_row, sft_row = data.examples[0], data.examples[len(data.examples) - 1]
    assert pretrain_row["document_ids"].max() > 0 and not any(sft_row["document_ids"])
    batch = collate([pretrain_row, sft_row], tokenizer.pad_id)
    assert batch["document_ids"].shape == batch["input_ids"].shape
    assert len(data.validation) == validation_limit(config.eval)  # the prepared val split's first rows
    held_out = TokenStore(corpora["pretrain"][1], "val", document_ids=True)
    assert data.validation == [as_lists(held_out[i]) for i in range(8)]
    sampler = data.sampler(8, seed=3)
    counts = Counter(int(i >= blocks) for batch in sampler.batches(0) for i in batch)
    assert [counts[0], counts[1]] == data.mixture.counts


def test_a_bad_mixture_names_the_source(corpora, tmp_path, tokenizer):
    pretrain, dpo = subset(tmp_path, "pretrain"), corpora["dpo"][1].root
    with pytest.raises(ValueError, match=r"data\.mixture\[1\]\.files: holds 'dpo' data, but stage 'pretrain'"):
        build_training_data(mixture_config([{"files": [str(pretrain)]}, {"files": [dpo]}]), tokenizer)
    with pytest.raises(ValueError, match=r"data\.mixture\[1\]\.format: holds 'dpo' data"):
        sources = [{"files": [str(pretrain)]}, {"files": [str(pretrain)], "format": "dpo"}]
        build_training_data(mixture_config(sources), tokenizer)
    sft = corpora["sft"][1].root
    config = mixture_config([{"files": [str(pretrain)]}, {"files": [sft]}], data={"seq_len": 128})
    with pytest.raises(ValueError, match=r"data\.mixture\[1\]\.files: .*prepared for seq_len 256"):
        build_training_data(config, tokenizer)


class CountingTokenizer:
    """The real tokenizer, counting the records it encodes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def encode(self, text):
        self.calls += 1
        return self.tokenizer.encode(text)

    def encode_with_offsets(self, text):
        self.calls += 1
        return self.tokenizer.encode_with_offsets(text)


def without_document_ids(examples):
    return [{key: value for key, value in example.items() if key != "document_ids"} for example in examples]


@pytest.mark.parametrize("fmt", ["sft", "pretrain"])
def test_jsonl_validation_comes_from_the_same_single_pass(tokenizer, tmp_path, fmt):
    path = subset(tmp_path, fmt)
    config = tiny_config(
        stage="sft" if fmt == "sft" else "pretrain",
        data={"train_files": [str(path)], "seq_len": 64},
        eval={"val_fraction": 0.2, "max_examples": 8, "continuation_docs": 2},
    )
    counting = CountingTokenizer(tokenizer)
    data = build_training_data(config, counting)
    records = SUBSETS[fmt][1]
    assert counting.calls <= records  # each record tokenized at most once (none when in the token cache)
    old = dict(files=[path], fmt=fmt, tokenizer=tokenizer, seq_len=64, val_fraction=0.2)
    # What the two passes of the old loader gave (packed pretrain blocks included), less document ids.
    held_out = load_examples(**old, split="val").examples
    assert data.validation == without_document_ids(held_out[: validation_limit(config.eval)])
    assert data.examples == without_document_ids(load_examples(**old, split="train").examples)
    train, validation = split_examples([path], fmt, tokenizer, 64, 0.2, val_limit=10**6)
    assert train.records_read == records and len(validation) == len(held_out)


def test_validation_files_are_read_only_as_far_as_needed(corpora, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path / "cache"))  # an empty token cache: the training file is read
    path = subset(tmp_path, "sft")
    config = tiny_config(
        stage="sft",
        data={"train_files": [str(path)], "seq_len": SEQ_LEN},
        eval={"val_files": [str(path)], "max_examples": 8, "continuation_docs": 2},
    )
    counting = CountingTokenizer(tokenizer)
    validation = build_training_data(config, counting).validation
    assert validation == load_examples([path], "sft", tokenizer, SEQ_LEN).examples[:8]
    # The training file is tokenized whole (one call per conversation), the validation file only as far as
    # its first 8 examples (a read that stops early does not use the token cache): reading it whole would make
    # this twice the records.
    assert counting.calls == SUBSETS["sft"][1] + 8
    config.eval.val_files = [corpora["sft"][1].root]
    prepared = build_training_data(config, tokenizer).validation
    assert prepared == Manifest.load(corpora["sft"][1].root).examples("val")[:8]


def test_eval_job_reads_only_the_leading_documents(corpora, tokenizer):
    from minimind.eval.job import leading_documents

    root = corpora["pretrain"][1].root
    documents = leading_documents([root], "pretrain", tokenizer, SEQ_LEN, 3)
    assert documents == [row["input_ids"] for row in Manifest.load(root).examples("val")[:3]]
