import json

import pytest
import ray
from conftest import SAMPLE

from minimind.data.formats import RecordError
from minimind.data.formats.pretrain import pack_documents
from minimind.data.jsonl import load_examples
from minimind.data.pipeline import Manifest
from minimind.data.pipeline.chunks import Chunk, lines_starting_in, number_chunks, plan_chunks, read_lines
from minimind.data.pipeline.prepare import PrepareOptions, prepare
from minimind.data.pipeline.validate import Filters, cjk_ratio
from minimind.data.token_store import TokenStore

GOOD = {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}
BAD_LINES = {  # line -> expected reason
    2: ("{not json", "invalid_json"),
    3: ("[1, 2]", "not_an_object"),
    4: (json.dumps({"text": "wrong format"}), "missing_field"),
    5: (json.dumps({"conversations": "hello"}), "wrong_type"),
    6: (
        json.dumps({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}),
        "empty_text",
    ),
    7: (
        json.dumps({"conversations": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        "unknown_role",
    ),
    8: (json.dumps({"conversations": [{"role": "user", "content": "only a question"}]}), "no_assistant_turn"),
    9: (b"\xff\xfe{}", "undecodable_bytes"),
    10: (
        json.dumps({"conversations": [{"role": "user", "content": "长" * 3000}, GOOD["conversations"][1]]}),
        "too_long",
    ),
}


def write(path, lines):
    with open(path, "wb") as handle:
        for line in lines:
            handle.write((line if isinstance(line, bytes) else line.encode("utf-8")) + b"\n")
    return path


def options(tmp_path, inputs, name="out", **kwargs):
    defaults = dict(seq_len=256, val_fraction=0.0, rows_per_shard=512, actors=2)
    defaults.update(kwargs)
    return PrepareOptions(inputs=[str(p) for p in inputs], out=str(tmp_path / name), **defaults)


def test_chunks_own_every_line_exactly_once(tmp_path):
    lines = [f'{{"text": "line {i} {"x" * (i % 37)}"}}' for i in range(500)]
    path = write(tmp_path / "a.jsonl", lines)
    for chunk_bytes in (7, 64, 1000, 1 << 20):
        ranges = plan_chunks([str(path)], chunk_bytes)
        chunks = number_chunks(ranges, [lines_starting_in(*r) for r in ranges])
        got = [(n, raw.decode()) for c in chunks for n, raw in read_lines(c)]
        assert got == [(i + 1, line) for i, line in enumerate(lines)], chunk_bytes
    assert list(read_lines(Chunk(str(path), 0, 0))) == []


def test_every_bad_row_is_counted_and_named(ray_address, tmp_path):
    lines = [json.dumps(GOOD, ensure_ascii=False)] + [BAD_LINES[n][0] for n in sorted(BAD_LINES)]
    lines.append(json.dumps(GOOD, ensure_ascii=False))
    sft_file = write(tmp_path / "bad_sft.jsonl", lines)
    prompt = [{"role": "user", "content": "天空是什么颜色？"}]
    dpo_file = write(
        tmp_path / "bad_dpo.jsonl",
        [
            json.dumps(
                {
                    "chosen": prompt + [{"role": "assistant", "content": "蓝色"}],
                    "rejected": prompt + [{"role": "assistant", "content": "绿色"}],
                }
            ),
            json.dumps(
                {
                    "chosen": prompt + [{"role": "assistant", "content": "蓝色"}],
                    "rejected": [{"role": "user", "content": "别的"}, {"role": "assistant", "content": "x"}],
                }
            ),
        ],
    )
    manifest = prepare(options(tmp_path, [sft_file], format="sft", filters=Filters(max_record_bytes=4000)))
    expected = {reason: 1 for _, reason in BAD_LINES.values()}
    assert manifest.rejects == dict(sorted(expected.items()))
    assert manifest.rows_in == 11 and manifest.records_out == 2
    rejects = [
        json.loads(line)
        for p in sorted((tmp_path / "out" / "rejects").glob("*.jsonl"))
        for line in p.read_text(encoding="utf-8").splitlines()
    ]
    assert sorted((r["line"], r["reason"]) for r in rejects) == sorted((n, r) for n, (_, r) in BAD_LINES.items())
    assert all(r["source"] == str(sft_file) and f"bad_sft.jsonl:{r['line']}:" in r["message"] for r in rejects)
    unknown_role = next(r for r in rejects if r["reason"] == "unknown_role")
    assert "field 'conversations[0].role'" in unknown_role["message"]
    dpo = prepare(options(tmp_path, [dpo_file], name="dpo"))  # format detected
    assert dpo.format == "dpo" and dpo.rejects == {"prompt_mismatch": 1} and dpo.records_out == 1


def test_strict_mode_stops_at_the_first_bad_row(ray_address, tmp_path):
    path = write(tmp_path / "s.jsonl", [json.dumps({"text": "fine"}), json.dumps({"text": ""}), "{broken"])
    with pytest.raises(RecordError) as error:
        prepare(options(tmp_path, [path], strict=True))
    assert f"{path}:2: field 'text': empty" in str(error.value)
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.parametrize(
    "file,fmt", [("pretrain.jsonl", "pretrain"), ("sft.jsonl", "sft"), ("dpo.jsonl", "dpo"), ("r1.jsonl", "r1")]
)
def test_every_sample_format_prepares_and_loads(ray_address, tmp_path, tokenizer, file, fmt):
    manifest = prepare(options(tmp_path, [SAMPLE / file], val_fraction=0.05))
    assert manifest.format == fmt  # detected
    assert manifest.records_out + manifest.rejected == manifest.rows_in
    in_process = load_examples([SAMPLE / file], fmt, tokenizer, 256)
    assert manifest.rejected == in_process.rejects.total
    if fmt != "pretrain":
        assert manifest.records_out == len(in_process.examples)
    assert len(TokenStore(manifest, "train")) == manifest.splits["train"]["rows"]
    assert ray.get(ray.put(1)) == 1 and manifest.ray_dataset("train").count() == manifest.splits["train"]["rows"]


def test_packed_shards_decode_back_to_the_documents(ray_address, tmp_path, tokenizer):
    texts = [f"文档 {i}：" + "内容" * (i % 50) + f" document number {i}." for i in range(400)]
    path = write(tmp_path / "docs.jsonl", [json.dumps({"text": t}, ensure_ascii=False) for t in texts])
    manifest = prepare(options(tmp_path, [path], seq_len=64, rows_per_shard=10_000))
    blocks = Manifest.load(tmp_path / "out").examples("train")
    expected = list(pack_documents([tokenizer.encode(t) + [tokenizer.eos_id] for t in texts], 64))
    # Shards are shuffled; put the blocks back in stream order, then decode the stream.
    position = {tuple(b["input_ids"]): i for i, b in enumerate(expected)}
    ordered = sorted(blocks, key=lambda b: position[tuple(b["input_ids"])])
    assert [b["input_ids"] for b in ordered] == [b["input_ids"] for b in expected]
    stream = [t for b in ordered for t in b["input_ids"]]
    assert tokenizer.decode(stream) == "<|im_end|>".join(texts) + "<|im_end|>"
    assert manifest.splits["train"]["padding_fraction"] < 0.01


def test_validation_split_is_unchanged_when_rows_are_appended(ray_address, tmp_path):
    lines = (SAMPLE / "sft.jsonl").read_text(encoding="utf-8").splitlines()
    first = write(tmp_path / "v1.jsonl", lines[:1000])
    grown = write(tmp_path / "v2.jsonl", lines)
    before = prepare(options(tmp_path, [first], name="a", val_fraction=0.1)).examples("val")
    after = prepare(options(tmp_path, [grown], name="b", val_fraction=0.1)).examples("val")
    before_set = {tuple(e["input_ids"]) for e in Manifest.load(tmp_path / "a").examples("val")}
    after_set = {tuple(e["input_ids"]) for e in Manifest.load(tmp_path / "b").examples("val")}
    assert before_set and before_set <= after_set and len(after) > len(before)


def test_finished_output_is_reused_and_checked(ray_address, tmp_path, tokenizer, capsys):
    opts = options(tmp_path, [SAMPLE / "r1.jsonl"], val_fraction=0.2)
    first = prepare(opts)
    shard = tmp_path / "out" / first.splits["train"]["shards"][0]["path"]
    stamp = shard.stat().st_mtime_ns
    second = prepare(opts)
    assert "up to date" in capsys.readouterr().out
    assert second.fingerprint == first.fingerprint and shard.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="prepared for seq_len 256, but this run has data.seq_len=512"):
        Manifest.load(tmp_path / "out").check(tokenizer.fingerprint, 512, "r1")
    with pytest.raises(ValueError, match="prepared with tokenizer"):
        Manifest.load(tmp_path / "out").check("0" * 16, 256)


def test_quality_filters_are_counted(ray_address, tmp_path):
    rows = [
        {"text": "这是一个中文句子，用来测试。"},
        {"text": "An English sentence only."},
        {"text": "短"},
        {"text": "这是一个中文句子，用来测试。"},
    ]
    path = write(tmp_path / "q.jsonl", [json.dumps(r, ensure_ascii=False) for r in rows])
    manifest = prepare(options(tmp_path, [path], filters=Filters(min_chars=2, min_cjk_ratio=0.8, dedup=True)))
    assert manifest.rejects == {"filtered_cjk_ratio": 1, "filtered_too_short": 1}
    assert manifest.duplicates == 1 and manifest.records_out == 1
    assert cjk_ratio("中文 and") == pytest.approx(2 / 5)
