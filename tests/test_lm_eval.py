"""lm-evaluation-harness on an HF export, with a local task: EleutherAI's harness scores the exported model
on the same multiple-choice questions as ``ray_jobs/eval.py --choices`` and picks the same options.

``lm-eval`` is not among the test extras (with its ``hf`` extra it brings datasets, accelerate, evaluate,
scikit-learn and more); this test runs where it is installed: ``pip install "lm-eval[hf]"``."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import choice_files

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")


def test_an_hf_export_runs_in_lm_eval_on_a_local_task_and_picks_what_our_scorer_picks(pretrained_run, tokenizer,
                                                                                      tmp_path):  # fmt: skip
    from minimind.eval.choices import load_questions, score_question
    from minimind.model.hf import export_hf

    trainer, _, _ = pretrained_run
    hf = export_hf(trainer.model.eval(), tokenizer, tmp_path / "hf")
    questions = load_questions([str(choice_files(tmp_path)[name]) for name in ("history_val.csv", "arithmetic.csv")])
    rows = [{"question": q.question, "choices": q.choices, "answer": q.answer} for q in questions]
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    # The context as ours: after an end-of-text token (documents start after one), the question, then 答案：; the
    # option follows with no delimiter.
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "minimind_local.yaml").write_text(textwrap.dedent(f"""\
        task: minimind_local
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tmp_path / "questions.jsonl"}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "<|im_end|>{{{{question}}}}\\n答案："
        target_delimiter: ""
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: answer
        metric_list:
          - metric: acc
        """))  # fmt: skip
    out = tmp_path / "results"
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={hf},dtype=float32",
               "--tasks", "minimind_local", "--include_path", str(tmp_path / "tasks"), "--device", "cpu",
               "--batch_size", "4", "--output_path", str(out), "--log_samples"]  # fmt: skip
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    [samples_file] = out.rglob("samples_minimind_local_*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    ours = [score_question(trainer.model, tokenizer, q, [], 128) for q in questions]
    for sample, record in zip(samples, ours, strict=True):
        theirs = [float(response[0]) for response in sample["filtered_resps"]]  # (log-likelihood, is greedy)
        assert theirs == pytest.approx(record["scores"], abs=2e-4), record["source"]
        assert sample["acc"] == float(record["correct"])
