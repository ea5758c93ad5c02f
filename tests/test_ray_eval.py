import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, SAMPLE, choice_files

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


@pytest.fixture(scope="module")
def local(base_checkpoint, subset, tokenizer):
    """The subset's perplexity in this process: the reference for Ray's scores."""
    examples = load_examples([subset], "sft", tokenizer, 256).examples
    model = load_model(base_checkpoint)
    batches = [collate(examples[i : i + 8], tokenizer.pad_id) for i in range(0, len(examples), 8)]
    return perplexity(model, batches, token_byte_lengths(tokenizer))


def test_eval_job_writes_json_and_markdown(ray_address, base_checkpoint, subset, local, tokenizer, tmp_path):
    from minimind.eval.choices import load_questions, score_question, shots_by_subject

    env = dict(os.environ, RAY_ADDRESS=ray_address)
    files = choice_files(tmp_path)
    # A training corpus with one question of the history file copied into a longer turn (spaces added).
    leaked = tmp_path / "leaked.jsonl"
    turn = {"role": "user", "content": "考考你：水在标准大气压下的 沸点是多少摄氏度？"}
    leaked.write_text(json.dumps({"conversations": [turn]}, ensure_ascii=False) + "\n", encoding="utf-8")
    choices = [str(files[name]) for name in ("history_val.csv", "arithmetic.csv", "mixed.jsonl")]
    command = [
        sys.executable, "ray_jobs/eval.py", "--checkpoint", str(base_checkpoint), "--data", str(subset),
        "--format", "sft", "--seq-len", "256", "--out", str(tmp_path), "--max-new-tokens", "8",
        "--continuation-docs", "4", "--choices", *choices, "--dev", str(files["history_dev.csv"]), "--shots", "1",
        "--contamination", str(leaked), str(SAMPLE / "sft.jsonl"),
    ]  # fmt: skip
    import ray

    @ray.remote(num_cpus=1)
    class Busy:
        def ready(self):
            return True

    # Another actor holds one of the cluster's 4 CPUs (another job, a run's workers still stopping): the job's pool
    # of 3 scoring actors (its CPUs - 1) once took the other 3, and its read tasks waited for a CPU for ever (a
    # hang, on CI). A time limit of its own, below pytest's, so that a job that hangs shows what it printed.
    busy = Busy.remote()
    ray.get(busy.ready.remote())
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as hung:
        printed = [part.decode() if isinstance(part, bytes) else part or "" for part in (hung.stdout, hung.stderr)]
        pytest.fail("ray_jobs/eval.py ran for 600 s:\n" + printed[0][-3000:] + printed[1][-3000:])
    finally:
        ray.kill(busy)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))
    scores = result["metrics"]
    assert {"val_perplexity", "val_bits_per_byte", "continuation_accuracy", "chat_adherence"} <= set(scores)
    # Scored by Ray Data's actors as in this process, the malformed lines counted by reason.
    assert scores["val_tokens"] == local["val_tokens"]
    assert scores["val_perplexity"] == pytest.approx(local["val_perplexity"], rel=1e-5)
    assert scores["val_bits_per_byte"] == pytest.approx(local["val_bits_per_byte"], rel=1e-5)
    assert scores["rejected_records"] == {"invalid_json": 1, "wrong_type": 1}
    assert 0 <= scores["continuation_accuracy"] <= 1 and 0 <= scores["chat_adherence"] <= 1
    assert [s["prompt"] for s in result["samples"]][0] == "你好，请介绍一下你自己。"
    markdown = (tmp_path / "eval.md").read_text(encoding="utf-8")
    assert f"| val_perplexity | {scores['val_perplexity']:.4f} |" in markdown and "## Samples" in markdown
    # Multiple choice over Ray: each question's scores as in this process (tests/test_eval.py holds those to
    # transformers' log-likelihoods), in file order, and the accuracies counted from them.
    model = load_model(base_checkpoint).eval()
    questions = load_questions([str(files[name]) for name in ("history_val.csv", "arithmetic.csv", "mixed.jsonl")])
    shots = shots_by_subject(load_questions([str(files["history_dev.csv"])]), 1)
    expected = [score_question(model, tokenizer, q, shots.get(q.subject, []), 256) for q in questions]
    records = [json.loads(line) for line in (tmp_path / "choices.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["source"] for r in records] == [q.source for q in questions]
    for record, reference in zip(records, expected):
        assert record["scores"] == pytest.approx(reference["scores"], abs=1e-5)
        assert (record["pick"], record["shots"]) == (reference["pick"], reference["shots"])
    assert scores["choice_accuracy"] == sum(r["pick"] == q.answer for r, q in zip(expected, questions)) / 7
    assert scores["choice_subjects"]["arithmetic"]["questions"] == 2 and scores["choice_chance"] < 0.5
    assert "## Multiple choice by subject" in markdown and "| arithmetic | 2 |" in markdown
    # Contamination: the copied question only (the sample's SFT corpus holds none of these questions).
    assert [r["contaminated"] for r in records] == [False, False, True, False, False, False, False]
    history = str(files["history_val.csv"])
    assert scores["choice_contamination"][history] == {"questions": 3, "contaminated": 1, "share": 1 / 3}
    assert scores["choice_contamination"][str(files["arithmetic.csv"])]["contaminated"] == 0
    contaminated = {name: block["contaminated"] for name, block in scores["choice_subjects"].items()}
    assert contaminated == {"history": 1, "arithmetic": 0, "常识": 0, "mixed": 0}, contaminated
    assert "1 (scores not trustworthy)" in markdown and f"| `{history}` | 3 | 1 | 33.3% |" in markdown


def test_ray_preference_scoring_equals_in_process_for_a_policy_apart_from_its_reference(
    ray_address, base_checkpoint, tokenizer, tmp_path
):
    import torch

    from minimind.eval.metrics import preference_accuracy
    from minimind.model.checkpoint import save_model

    torch.manual_seed(0)
    policy = load_model(base_checkpoint)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    (tmp_path / "policy").mkdir()
    save_model(policy, tmp_path / "policy")
    data = tmp_path / "pairs.jsonl"  # 100 pairs: enough for wins and losses, quick to score twice
    data.write_text("\n".join((SAMPLE / "dpo.jsonl").read_text(encoding="utf-8").splitlines()[:100]) + "\n")
    job = ScoringJob(str(tmp_path / "policy"), "dpo", 256, reference=str(base_checkpoint))
    metrics = score_files([str(data)], job, num_actors=1, lines_per_batch=50)
    assert metrics["pairs"] + sum(metrics["rejected_records"].values()) == 100
    pairs = load_examples([data], "dpo", tokenizer, 256).examples
    batches = [collate(pairs[i : i + 8], tokenizer.pad_id) for i in range(0, len(pairs), 8)]
    local = preference_accuracy(policy, load_model(base_checkpoint), batches, job.beta)
    assert metrics["pairs"] == len(pairs)
    assert 0 < local["reward_accuracy"] < 1  # the policy wins some pairs and loses others
    # Batched differently (padding): a pair whose margin is within fp32 rounding of 0 may fall either side.
    assert metrics["reward_accuracy"] == pytest.approx(local["reward_accuracy"], abs=2.5 / len(pairs))
    assert metrics["reward_margin"] == pytest.approx(local["reward_margin"], rel=1e-4, abs=1e-5)
