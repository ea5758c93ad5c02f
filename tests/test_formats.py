import json

import pytest
import torch

from minimind.data.dataset import collate
from minimind.data.formats import IGNORE_INDEX, RecordError, dpo, sft
from minimind.data.formats.pretrain import pack_documents
from minimind.data.jsonl import load_examples
from minimind.data.sampler import BatchSampler
from minimind.train.objectives import LanguageModeling


def segments(tokenizer, messages):
    """Expected ids and target flags built turn by turn: header/user/system tokens are never targets."""
    ids, targets = [], []
    for message in messages:
        header = tokenizer.encode(f"<|im_start|>{message['role']}\n")
        content = tokenizer.encode(message["content"])
        is_reply = message["role"] == "assistant"
        ids += header + content + [tokenizer.eos_id] + tokenizer.encode("\n")
        targets += [False] * len(header) + [is_reply] * (len(content) + 1) + [False]
    return ids, targets


CONVERSATION = [
    {"role": "system", "content": "你是MiniMind，一个小模型。"},
    {"role": "user", "content": "你好"},
    {"role": "user", "content": "What is 2+2?"},  # two user turns in a row: roles come from the data
    {"role": "assistant", "content": "2+2=4。"},
    {"role": "user", "content": "再说一遍"},
    {"role": "assistant", "content": "<think>\nsimple\n</think>\n<answer>\n4\n</answer>"},
]


def test_sft_labels_cover_exactly_assistant_content_and_end_token(tokenizer):
    example = sft.encode_conversation(CONVERSATION, tokenizer, seq_len=1024)
    ids, targets = segments(tokenizer, CONVERSATION)
    assert example["input_ids"] == ids
    assert example["labels"] == [t if flag else IGNORE_INDEX for t, flag in zip(ids, targets)]
    labelled = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "2+2=4。<|im_end|><think>\nsimple\n</think>\n<answer>\n4\n</answer><|im_end|>"


def test_sft_truncation_and_no_target_left(tokenizer):
    long = [{"role": "user", "content": "字" * 400}, {"role": "assistant", "content": "好"}]
    with pytest.raises(RecordError, match="no assistant token within the first 32 tokens"):
        sft.encode_conversation(long, tokenizer, seq_len=32)
    full = sft.encode_conversation(CONVERSATION, tokenizer, seq_len=1024)
    cut = next(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX) + 2
    example = sft.encode_conversation(CONVERSATION, tokenizer, seq_len=cut)
    assert example["input_ids"] == full["input_ids"][:cut] and example["labels"] == full["labels"][:cut]


def test_dpo_masks_the_prompt_and_checks_it_is_shared(tokenizer):
    prompt = [{"role": "user", "content": "天空是什么颜色？"}]
    record = {
        "chosen": prompt + [{"role": "assistant", "content": "蓝色"}],
        "rejected": prompt + [{"role": "assistant", "content": "绿色的"}],
    }
    pair = dpo.encode_pair(dpo.parse(record), tokenizer, seq_len=128)
    for side, reply in (("chosen", "蓝色"), ("rejected", "绿色的")):
        labels = [t for t in pair[f"{side}_labels"] if t != IGNORE_INDEX]
        assert tokenizer.decode(labels) == reply + "<|im_end|>"
    bad = dict(record, rejected=[{"role": "user", "content": "别的问题"}, {"role": "assistant", "content": "x"}])
    with pytest.raises(RecordError, match="different prompts") as error:
        dpo.parse(bad)
    assert error.value.reason == "prompt_mismatch" and error.value.field_name == "rejected"


def test_reasoning_weights_fall_only_on_tags_inside_the_reply(tokenizer):
    example = sft.encode_conversation(CONVERSATION, tokenizer, seq_len=1024)
    batch = collate([example], tokenizer.pad_id)
    weights = LanguageModeling(tokenizer.reasoning_spellings, 10.0)._weights(batch["labels"])[0]
    targets = batch["labels"][0, 1:]
    tags = torch.isin(targets, torch.tensor([3, 4, 5, 6]))  # single tokens in the bundled tokenizer
    assert int(tags.sum()) == 4
    assert torch.all(weights[tags] == 10.0)
    assert torch.all(weights[~tags & (targets != IGNORE_INDEX)] == 1.0)
    assert torch.all(weights[targets == IGNORE_INDEX] == 0.0)


def test_packing_decodes_back_to_documents_joined_by_separators(tokenizer):
    texts = ["第一篇文档。", "Second document, a little longer than the first one.", "三"]
    documents = [tokenizer.encode(t) + [tokenizer.eos_id] for t in texts]
    blocks = list(pack_documents(documents, seq_len=7))
    assert all(len(b["input_ids"]) == 7 for b in blocks[:-1]) and len(blocks[-1]["input_ids"]) <= 7
    stream = [t for b in blocks for t in b["input_ids"]]
    assert tokenizer.decode(stream) == "<|im_end|>".join(texts) + "<|im_end|>"
    # document ids restart in every block and change exactly after each separator
    for block in blocks:
        for i in range(1, len(block["input_ids"])):
            boundary = block["input_ids"][i - 1] == tokenizer.eos_id
            assert block["document_ids"][i] == block["document_ids"][i - 1] + int(boundary)


def write_lines(path, lines):
    with open(path, "wb") as handle:
        for line in lines:
            handle.write(line if isinstance(line, bytes) else line.encode("utf-8"))
            handle.write(b"\n")


def bad_sft_file(tmp_path):
    good = json.dumps({"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    lines = [
        good,
        "{not json",
        "[1, 2]",
        json.dumps({"text": "wrong format"}),
        json.dumps({"conversations": [{"role": "robot", "content": "x"}]}),
        json.dumps({"conversations": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"conversations": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}),
        b"\xff\xfe not utf-8",
        good,
    ]
    path = tmp_path / "bad.jsonl"
    write_lines(path, lines)
    return path


def test_lenient_loading_counts_each_bad_record_by_reason(tmp_path, tokenizer):
    examples = load_examples([bad_sft_file(tmp_path)], "sft", tokenizer, 64)
    assert len(examples.examples) == 2 and examples.records_read == 9
    assert dict(examples.rejects.by_reason) == {
        "invalid_json": 1,
        "not_an_object": 1,
        "missing_field": 1,
        "unknown_role": 1,
        "no_assistant_turn": 1,
        "wrong_type": 1,
        "undecodable_bytes": 1,
    }
    assert any("bad.jsonl:5: field 'conversations[0].role'" in e for e in examples.rejects.examples)


def test_strict_loading_stops_at_the_first_bad_record_naming_file_line_field(tmp_path, tokenizer):
    path = tmp_path / "pretrain.jsonl"
    write_lines(path, [json.dumps({"text": "fine"}), json.dumps({"text": ""}), "{broken"])
    with pytest.raises(RecordError) as error:
        load_examples([path], "pretrain", tokenizer, 64, strict=True)
    assert str(error.value).startswith(f"{path}:2: field 'text': empty")
    assert error.value.line == 2 and error.value.field_name == "text"


def test_a_file_read_in_full_is_tokenized_once_and_read_afresh_once_it_changes(tmp_path, tokenizer, monkeypatch):
    """minimind/data/token_cache.py: a second read of the file encodes nothing and gives what encoding each line
    gives, its rejects and their lines included; once the file changes it is encoded again."""
    from minimind.data import jsonl
    from minimind.data.formats import encode_record
    from minimind.data.formats.records import parse_line

    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path / "cache"))  # empty: other tests read the same lines
    path = bad_sft_file(tmp_path)
    expected = []  # each line encoded by hand, as no cache would
    for raw in path.read_bytes().splitlines():
        try:
            expected.append(encode_record("sft", parse_line(raw), tokenizer, 64))
        except RecordError:
            continue
    with pytest.raises(RecordError) as uncached:
        load_examples([path], "sft", tokenizer, 64, strict=True, limit=9)  # a limited read: not stored
    first = load_examples([path], "sft", tokenizer, 64)  # read in full: stored
    assert first.examples == expected

    def refuse(*args):
        raise AssertionError("a record was encoded again")

    with monkeypatch.context() as patched:
        patched.setattr(jsonl, "encode_record", refuse)
        again = load_examples([path], "sft", tokenizer, 64)
        assert again.examples == expected and again.records_read == first.records_read == 9
        assert (again.rejects.by_reason, again.rejects.examples) == (first.rejects.by_reason, first.rejects.examples)
        with pytest.raises(RecordError) as cached:
            load_examples([path], "sft", tokenizer, 64, strict=True)
        assert str(cached.value) == str(uncached.value) and cached.value.line == uncached.value.line

    with open(path, "ab") as handle:
        handle.write(json.dumps({"conversations": CONVERSATION}, ensure_ascii=False).encode() + b"\n")
    grown = load_examples([path], "sft", tokenizer, 64)
    assert grown.examples == [*expected, encode_record("sft", {"conversations": CONVERSATION}, tokenizer, 64)]


@pytest.mark.parametrize(
    "fmt,file",
    [
        ("pretrain", "pretrain.jsonl"),
        ("sft", "sft.jsonl"),
        ("dpo", "dpo.jsonl"),
        ("r1", "r1.jsonl"),
        ("sft", "lora_identity.jsonl"),
    ],
)
def test_every_bundled_sample_loads(sample_dir, tokenizer, fmt, file):
    examples = load_examples([sample_dir / file], fmt, tokenizer, 512)
    assert examples.examples
    if fmt == "dpo":  # some sample prompts exceed 512 tokens: counted as such, nothing else
        assert set(examples.rejects.by_reason) == {"reply_beyond_seq_len"}
        assert len(examples.examples) + examples.rejects.total == examples.records_read
        assert "field 'chosen': no assistant token within the first 512 tokens" in examples.rejects.examples[0]
    else:
        assert examples.rejects.total == 0


def test_collate_pads_only_to_the_longest_and_counts_padding(tokenizer):
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}], tokenizer.pad_id
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert int(batch["real_tokens"]) == 4 and int(batch["total_tokens"]) == 6


def test_sampler_order_is_seeded_per_epoch_and_resumable():
    sampler = BatchSampler(num_examples=50, batch_size=4, seed=3)
    epoch0 = list(sampler.batches(0))
    assert epoch0 == list(BatchSampler(50, 4, 3).batches(0))
    assert epoch0 != list(sampler.batches(1))
    assert list(sampler.batches(0, start=5)) == epoch0[5:]
    assert sorted(i for b in epoch0 for i in b) == list(range(50))
    ranks = [list(BatchSampler(50, 4, 3, rank=r, world_size=2).batches(0)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 6
    assert not set(map(tuple, ranks[0])) & set(map(tuple, ranks[1]))


def test_length_grouping_cuts_padding_and_keeps_every_example(sample_dir, tokenizer):
    examples = load_examples([sample_dir / "sft.jsonl"], "sft", tokenizer, 512).examples
    lengths = [len(e["input_ids"]) for e in examples]

    def padding(sampler):
        batches = list(sampler.batches(0))
        assert sorted(i for b in batches for i in b) == list(range(len(examples)))
        padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
        return 1 - sum(lengths) / padded

    plain = padding(BatchSampler(len(examples), 16, seed=0))
    grouped_sampler = BatchSampler(len(examples), 16, seed=0, lengths=lengths)
    grouped = padding(grouped_sampler)
    assert grouped < plain / 3, (plain, grouped)
    assert list(grouped_sampler.batches(0, start=7)) == list(grouped_sampler.batches(0))[7:]
    assert list(grouped_sampler.batches(1)) != list(grouped_sampler.batches(0))


@pytest.mark.parametrize("normalizer", ["weighted", "tokens"])
def test_reasoning_loss_is_divided_as_its_normalizer_says(tokenizer, normalizer):
    """``weighted``: a weighted mean (sum of w*CE over the sum of w). ``tokens``: the same weighted
    sum over the number of labelled tokens, MiniMind's r1 loss (so 10x tags raise a batch's loss)."""
    from minimind.config import model_config
    from minimind.model import MiniMindLM

    torch.manual_seed(0)
    model = MiniMindLM(model_config("tiny")).eval()
    batch = collate([sft.encode_conversation(CONVERSATION, tokenizer, seq_len=1024)], tokenizer.pad_id)
    objective = LanguageModeling(tokenizer.reasoning_spellings, 10.0, normalize_by_tokens=normalizer == "tokens")
    with torch.no_grad():
        loss = objective(model, batch).loss_sum / objective.normalizer(batch)
        logits = model(batch["input_ids"])[0][0, :-1]
    targets = batch["labels"][0, 1:]
    labelled = targets != IGNORE_INDEX
    ce = torch.nn.functional.cross_entropy(logits[labelled], targets[labelled], reduction="none")
    weights = torch.where(torch.isin(targets[labelled], torch.tensor([3, 4, 5, 6])), 10.0, 1.0)
    expected = (weights * ce).sum() / (weights.sum() if normalizer == "weighted" else labelled.sum())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
