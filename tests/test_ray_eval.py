import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, SAMPLE

from minimind.data.dataset import collate
from minimind.data.jsonl import load_examples
from minimind.eval.distributed import ScoringJob, score_files
from minimind.eval.evaluator import token_byte_lengths
from minimind.eval.metrics import perplexity
from minimind.model.checkpoint import load_model


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    """300 SFT lines plus two malformed ones."""
    path = tmp_path_factory.mktemp("data") / "val.jsonl"
    lines = (SAMPLE / "sft.jsonl").read_text(encoding="utf-8").splitlines()[:300]
    path.write_text("\n".join(lines + ["{oops", json.dumps({"conversations": []})]) + "\n", encoding="utf-8")
    return path


def test_ray_scoring_equals_in_process_perplexity(ray_address, base_checkpoint, subset, tokenizer):
    metrics = score_files([str(subset)], ScoringJob(str(base_checkpoint), "sft", 256), num_actors=2, lines_per_batch=64)
    examples = load_examples([subset], "sft", tokenizer, 256).examples
    model = load_model(base_checkpoint)
    batches = [collate(examples[i : i + 8], tokenizer.pad_id) for i in range(0, len(examples), 8)]
    local = perplexity(model, batches, token_byte_lengths(tokenizer))
    assert metrics["val_tokens"] == local["val_tokens"]
    assert metrics["val_perplexity"] == pytest.approx(local["val_perplexity"], rel=1e-5)
    assert metrics["val_bits_per_byte"] == pytest.approx(local["val_bits_per_byte"], rel=1e-5)
    assert metrics["rejected_records"] == {"invalid_json": 1, "wrong_type": 1}


def test_eval_job_writes_json_and_markdown(ray_address, base_checkpoint, subset, tmp_path):
    env = dict(os.environ, RAY_ADDRESS=ray_address)
    subprocess.run(
        [
            sys.executable,
            "ray_jobs/eval.py",
            "--checkpoint",
            str(base_checkpoint),
            "--data",
            str(subset),
            "--format",
            "sft",
            "--seq-len",
            "256",
            "--out",
            str(tmp_path),
            "--max-new-tokens",
            "8",
            "--continuation-docs",
            "4",
        ],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))
    assert {"val_perplexity", "val_bits_per_byte", "continuation_accuracy", "chat_adherence"} <= set(result["metrics"])
    assert [s["prompt"] for s in result["samples"]][0] == "你好，请介绍一下你自己。"
    markdown = (tmp_path / "eval.md").read_text(encoding="utf-8")
    assert "| val_perplexity |" in markdown and "## Samples" in markdown


def test_ray_preference_scoring_against_itself_is_neutral(ray_address, base_checkpoint):
    job = ScoringJob(str(base_checkpoint), "dpo", 256, reference=str(base_checkpoint))
    metrics = score_files([str(SAMPLE / "dpo.jsonl")], job, num_actors=1, lines_per_batch=200)
    assert metrics["reward_accuracy"] == 0.0 and metrics["reward_margin"] == 0.0
    assert metrics["pairs"] + sum(metrics["rejected_records"].values()) == 600
