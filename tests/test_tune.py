"""Ray Tune + Optuna sweeps: search-space validation, define-by-run sampling, and real sweeps on
the session's two-node cluster (tiny preset, sample corpus), judged by the files they write."""

import json
import os
import subprocess
import sys
import textwrap

import optuna
import pytest
from conftest import ROOT, SAMPLE
from ray_runs import metrics

from minimind.config import ConfigError
from minimind.tune.space import load_space

TINY_SWEEP = """\
stage: pretrain
recipe: recipes/tiny/pretrain.yaml
budget: {max_tokens: 5120, eval_every_tokens: 1280, grace_tokens: 2560, reduction_factor: 2}
overrides:
  data.seq_len: 64
  optim.warmup_steps: 2
  eval.val_fraction: 0.1
  eval.max_examples: 8
  eval.continuation_docs: 2
  eval.prefix_tokens: 16
  eval.continuation_tokens: 8
  logging.every_steps: 5
params:
  optim.lr: {loguniform: [1.0e-3, 3.0e-2]}
  optim.batch_size: {choice: [4, 8, 16]}
points:
  - {optim.lr: 1.0e+30, optim.batch_size: 8}    # diverges at once: a trial that must fail cleanly
"""


def write_space(tmp_path, text: str, name: str = "space.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize(
    "param, line, message",
    [
        ("optim.lrr: {loguniform: [1.0e-4, 1.0e-2]}", 5, r"params\.optim\.lrr: .*did you mean 'lr'"),
        ("optim.lr: {loguniform: [1.0e-2, 1.0e-4]}", 5, r"params\.optim\.lr: empty range"),
        ("lora.enabled: {uniform: [0, 1]}", 5, r"params\.lora\.enabled: uniform needs a numeric field; .* is bool"),
        ("optim.batch_size: {choice: [0, 16]}", 5, r"params\.optim\.batch_size: the run config rejects 0"),
        ("optim.warmup_steps: {int: [0.5, 10]}", 5, r"params\.optim\.warmup_steps: .*integer field"),
        ("optim.lr: {loguniform: [1.0e-1, 1.0]}", 5, r"params\.optim\.lr: the recipe's value 0\.01 is outside"),
        ("lora.alpha: {uniform: [1, 8], when: {lora.enabld: true}}", 5, r"params\.lora\.alpha\.when: 'lora\.enabld'"),
    ],
)
def test_an_invalid_space_is_refused_naming_file_line_and_field(tmp_path, param, line, message):
    path = write_space(
        tmp_path,
        f"""\
        stage: pretrain
        recipe: recipes/tiny/pretrain.yaml
        params:
          optim.grad_accum_steps: {{choice: [1, 2]}}
          {param}
        """,
    )
    with pytest.raises(ConfigError, match=rf"^{path}:{line}: {message}"):
        load_space(path)


def test_the_sweep_command_refuses_a_bad_space_before_starting_ray(tmp_path):
    path = write_space(tmp_path, "stage: pretrain\nrecipe: recipes/tiny/pretrain.yaml\nparms: {}\n")
    done = subprocess.run(
        [sys.executable, "ray_jobs/tune.py", "--space", str(path), "--storage-path", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"},
    )  # fmt: skip
    assert done.returncode == 2
    assert f"config error: {path}:3: parms: unknown key" in done.stderr


def test_a_conditional_parameter_is_sampled_only_when_its_condition_holds(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{preset: tiny}}\ndata: {{train_files: [{SAMPLE / 'sft.jsonl'}]}}\n")
    path = write_space(
        tmp_path,
        f"""\
        stage: sft
        recipe: {recipe}
        params:
          lora.enabled: {{choice: [false, true]}}
          lora.alpha: {{loguniform: [4, 64], when: {{lora.enabled: true}}}}
          optim.lr: {{loguniform: [1.0e-5, 1.0e-3]}}
        """,
    )
    space = load_space(path)
    assert space.baseline() == {"lora.enabled": False, "optim.lr": 5e-4}  # alpha does not apply to the recipe
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    study.enqueue_trial(space.baseline())
    study.optimize(lambda trial: space(trial) or 0.0, n_trials=16)
    assert study.trials[0].params == space.baseline()
    assert {t.params["lora.enabled"] for t in study.trials} == {False, True}
    for trial in study.trials:
        assert ("lora.alpha" in trial.params) == trial.params["lora.enabled"]


def test_objective_mixes_are_parsed_and_unknown_metrics_refused():
    from minimind.tune.sweep import Objective

    mix = Objective.parse("continuation_accuracy=1, val_loss=-0.5")
    assert mix.mode == "max" and mix({"continuation_accuracy": 0.5, "val_loss": 3.0}) == pytest.approx(-1.0)
    assert mix({"val_loss": 3.0}) is None  # a row without the evaluation is no result
    assert Objective.parse("val_perplexity").mode == "min"
    with pytest.raises(ConfigError, match="unknown metric 'val_perplexty'"):
        Objective.parse("val_perplexty")


def trial_records(sweep_dir):
    return {p.parent.name: json.loads(p.read_text()) for p in (sweep_dir / "trials").glob("*/trial.json")}


def test_a_sweep_runs_its_trials_fails_the_diverging_one_and_reports_a_best_config_that_runs(ray_cluster, tmp_path):
    space = write_space(tmp_path, TINY_SWEEP)
    journal = tmp_path / "study.log"
    command = [sys.executable, "ray_jobs/tune.py", "--space", str(space), "--num-samples", "3", "--name", "sweep",
               "--storage-path", str(tmp_path), "--optuna-storage", str(journal), "--seed", "1"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    sweep_dir = tmp_path / "sweep"

    trials = trial_records(sweep_dir)
    assert len(trials) == 3
    baseline = [t for t in trials.values() if t["baseline"]]
    assert [t["params"] for t in baseline] == [{"optim.lr": 1e-2, "optim.batch_size": 16}]
    [diverged] = [t for t in trials.values() if t["params"]["optim.lr"] == 1e30]
    assert diverged["status"] == "failed" and "NaN/inf" in diverged["reason"]
    finished = {tid: t for tid, t in trials.items() if t["status"] == "finished"}
    assert finished, trials
    # Every finished trial trained the same budget of tokens, whatever its batch size.
    for trial_id in finished:
        assert metrics(sweep_dir / "trials" / trial_id)[-1]["tokens"] == 5120

    report = (sweep_dir / "report.md").read_text()
    assert diverged["reason"] in report
    best_id = min(finished, key=lambda tid: metrics(sweep_dir / "trials" / tid)[-1]["val_perplexity"])
    assert f"Best trial: `{best_id}`" in report
    html = (sweep_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and "<script src" not in html
    assert "[sweep] 3/3 trials done" in done.stdout

    # Optuna's own tools open the study: the baseline first, the diverged trial failed.
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name="sweep", storage=storage)
    assert len(study.trials) == 3 and study.trials[0].params == baseline[0]["params"]
    assert optuna.trial.TrialState.FAIL in {t.state for t in study.trials}

    # best.yaml runs as is and reproduces the best trial.
    rerun = [sys.executable, "ray_jobs/pretrain.py", "--config", str(sweep_dir / "best.yaml"),
             "--storage-path", str(tmp_path / "best")]  # fmt: skip
    done = subprocess.run(rerun, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    [run_dir] = (tmp_path / "best").iterdir()
    best_final = metrics(sweep_dir / "trials" / best_id)[-1]
    assert metrics(run_dir)[-1]["val_perplexity"] == pytest.approx(best_final["val_perplexity"], rel=1e-6)
