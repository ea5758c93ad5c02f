"""Ray Tune + Optuna sweeps: search-space validation, define-by-run sampling, and real sweeps on
the session's two-node cluster (tiny preset, sample corpus), judged by the files they write."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import optuna
import pytest
from conftest import ROOT, SAMPLE
from ray.tune.search import Searcher
from ray.tune.utils import flatten_dict
from ray_runs import metrics, train_workers, trial_records

from minimind.config import ConfigError, build_config, load_yaml
from minimind.tune.records import asha_decisions, pruned_trials
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


HEAD = "stage: pretrain\nrecipe: recipes/tiny/pretrain.yaml\n"
SEARCHED = "params:\n  optim.lr: {choice: [1.0e-2, 1.0e-3]}\n"


@pytest.mark.parametrize(
    "text, line, message",
    [
        (HEAD + "params:\n  optim.lr: {lognormal: [1.0e-3, 1.0e-2]}\n", 4, r"params\.optim\.lr: needs one of"),
        (HEAD + "budget: 5\n" + SEARCHED, 3, r"budget: must be a mapping"),
        (HEAD + "budget: {max_tokenz: 100}\n" + SEARCHED, 3, r"budget\.max_tokenz: unknown key"),
        (HEAD + "budget: {max_tokens: -5}\n" + SEARCHED, 3, r"budget\.max_tokens: must be a positive number"),
        (HEAD + "budget: {max_tokens: 1000, grace_tokens: 5000}\n" + SEARCHED, 3, r"budget\.grace_tokens: 5000 is"),
        (HEAD + SEARCHED + "points: {optim.lr: 1.0e-3}\n", 5, r"points: must be a list"),
        (HEAD + SEARCHED + "points:\n  - {optim.lr: 1.0e-3}\n  - 5\n", 7, r"points\[1\]: must be a mapping"),
        (HEAD + SEARCHED + "points:\n  - {optim.lrr: 1.0e-3}\n", 6, r"points\[0\]\.optim\.lrr: is not a searched"),
        (HEAD + SEARCHED + "points:\n  - {optim.lr: 5.0e-3}\n", 6, r"points\[0\]\.optim\.lr: 0\.005 is not one of"),
        (HEAD + "params:\n  optim.lr: {choice: [1.0e-2]\n", 5, r"not valid YAML: expected ',' or '}'"),
        ("- stage\n- recipe\n", 1, r"the top level must be a mapping"),
        (HEAD + "overrides: {optim.schedule: wsd}\nparams:\n  optim.max_steps: {choice: [10, 20]}\n", 5,
         r"params\.optim\.max_steps: under optim\.schedule: wsd list the lengths as budget\.durations_tokens"),
        (HEAD + "overrides: {optim.schedule: wsd}\nparams:\n  optim.epochs: {choice: [2]}\n", 5,
         r"params\.optim\.epochs: under optim\.schedule: wsd the epochs are durations .* at least two"),
        (HEAD + "overrides: {optim.schedule: wsd}\nbudget: {max_tokens: 5000}\n" + SEARCHED
         + "  optim.epochs: {choice: [1, 2]}\n", 7, r"params\.optim\.epochs: the durations are these epochs"),
        (HEAD + "stage: sft\n" + SEARCHED, 3, r"not valid YAML: the key 'stage' appears twice \(first on line 1\)"),
    ],
)  # fmt: skip
def test_a_bad_budget_point_or_document_is_refused_naming_file_line_and_field(tmp_path, text, line, message):
    path = write_space(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^{path}:{line}: {message}"):
        load_space(path)
    if "top level" in message or "YAML" in message:  # a recipe is read the same way
        with pytest.raises(ConfigError, match=rf"^{path}:{line}: {message}"):
            load_yaml(path)


@pytest.mark.parametrize("path", sorted((ROOT / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_space_is_valid_and_its_baseline_is_its_recipe(path, monkeypatch):
    from minimind.tune.plan import Objective, SweepPlan

    monkeypatch.chdir(ROOT)  # spaces name recipes relative to the repository
    space = load_space(path)
    plan = SweepPlan("check", "unused", space, Objective.parse(space.objective))
    plan.check()
    configs = plan.stage_configs(space.baseline(), "unused")
    for index, (base, config) in enumerate(zip(space.stage_bases(), configs)):
        recipe = build_config(base)
        assert config.optim.lr == recipe.optim.lr and config.optim.batch_size == recipe.optim.batch_size, index


def test_epochs_under_wsd_are_durations_of_one_trial_counted_as_the_loop_counts_an_epoch(monkeypatch, tmp_path):
    """`optim.epochs: {choice: [1, 2]}` under WSD: not sampled; every trial trains 2 epochs once and is scored
    at the end of the first by the cooldown branch that is a 1-epoch run's decay."""
    from minimind.train.compute import tokens_per_step
    from minimind.train.loop import Trainer
    from minimind.tune.plan import Objective, SweepPlan

    monkeypatch.chdir(ROOT)
    path = write_space(tmp_path, HEAD + "overrides: {optim.schedule: wsd, data.seq_len: 64, eval.val_fraction: 0.1}\n"
                       + SEARCHED + "  optim.epochs: {choice: [2, 1]}\n")  # fmt: skip
    space = load_space(path)
    assert [param.name for param in space.params] == ["optim.lr"] and space.budget.durations_epochs == [1, 2]
    plan = SweepPlan("epochs", "unused", space, Objective.parse("val_loss"))
    plan.check()
    config = plan.trial_config({"optim.lr": 1e-3})
    epoch = Trainer(config).steps_per_epoch  # the reference: the training loop's own epoch
    assert plan.space.budget.durations_tokens == [epoch * tokens_per_step(config), 2 * epoch * tokens_per_step(config)]
    assert (config.optim.epochs, config.optim.max_steps, config.eval.cooldown_durations) == (2, 2 * epoch, [epoch])

    # The best length, a 1-epoch run's decay beating the longer run's end, is best.yaml's: one plain WSD epoch.
    from minimind.config import load_config
    from minimind.tune.report import TrialRecord
    from minimind.tune.results import write_best_configs

    plan.sweep_dir = str(tmp_path / "sweep")
    (tmp_path / "sweep").mkdir()
    per_epoch = epoch * tokens_per_step(config)
    best = TrialRecord("t1", {"optim.lr": 1e-3}, "finished", 60.0, {}, 2 * per_epoch, 1.0,
                       durations=[(per_epoch, 55.0), (2 * per_epoch, 60.0)])  # fmt: skip
    write_best_configs(plan, best)
    again = load_config(tmp_path / "sweep" / "best.yaml")
    assert (again.optim.epochs, again.optim.max_steps, again.eval.cooldown_durations) == (1, epoch, [])


def test_durations_come_from_one_trial_whose_cooldown_branches_are_the_shorter_runs(monkeypatch):
    from minimind.train.loop import Trainer
    from minimind.tune.plan import Objective, SweepPlan
    from minimind.tune.results import duration_position

    monkeypatch.chdir(ROOT)
    space = load_space(ROOT / "search_spaces" / "tiny_wsd.yaml", {"eval.every_steps": 0, "data.seq_len": 64})
    plan = SweepPlan("durations", "unused", space, Objective.parse("val_loss"))
    plan.check()
    # 16 x 64 = 1,024 tokens a step: the durations are 20 and 40 steps. The cooldown fraction defaults to
    # 0.2 / 0.8 = 0.25, and the branch from step 16 trains round(0.25 * 16) = 4 steps: it ends at step 20,
    # the decay of a 20-step run being its last round(0.2 * 20) = 4 steps.
    # ASHA's rungs, at 10,240 and 20,480 tokens, are reached at steps 10 and 20: evaluated and saved there.
    config = plan.trial_config({"optim.lr": 1e-2, "optim.batch_size": 16})
    config.eval.every_steps = 0  # only the duration's and the rungs' evaluations (not the recipe's own)
    assert (config.optim.max_steps, config.eval.at_steps, config.eval.cooldown_fraction) == (40, [10, 16, 20], 0.25)
    assert config.eval.cooldown_durations == [20]
    assert config.checkpoint.at_steps == [10, 20]
    long_run = Trainer(config).fit()
    cooled = next(row for row in long_run.history if row["step"] == 16)
    assert (cooled["step"], cooled["cooldown_steps"], cooled["duration_tokens"]) == (16, 4, 20 * 1024)
    # Placed as the budget counts lengths (padding included): 20 steps of 1,024, the first duration exactly.
    assert duration_position(cooled) == 20 * 1024 == space.budget.durations_tokens[0]
    padded = {"step": 16, "cooldown_steps": 4, "budget_tokens": 16 * 1024, "tokens": 9_000, "duration_tokens": 11_000}
    assert duration_position(padded) == 20 * 1024  # an SFT row: real tokens fall short of the budget's
    short = plan.trial_config({"optim.lr": 1e-2, "optim.batch_size": 16})
    short.optim.max_steps, short.eval.at_steps, short.eval.every_steps = 20, [], 0
    # The same batches, lrs and optimizer state in the same order: the 20-step run's value exactly.
    assert cooled["val_loss"] == Trainer(short).fit().final_eval["val_loss"]
    with pytest.raises(ConfigError, match="budget.durations_tokens: .*set optim.schedule: wsd"):
        SweepPlan("x", "unused", load_space(ROOT / "search_spaces" / "tiny_wsd.yaml", {"optim.schedule": "cosine"}),
                  Objective.parse("val_loss")).check()  # fmt: skip
    # Batch 16, a choice the baseline (8) is not, halves the steps: a 10-step duration inside a 10-step warmup,
    # refused before any trial runs, naming the parameter's line.
    with pytest.raises(ConfigError, match=r"tiny_wsd\.yaml:\d+: params\.optim\.batch_size = 16: a trial with it "
                       r"would be refused: budget\.durations_tokens: 20480 tokens are 10 steps"):  # fmt: skip
        SweepPlan("x", "unused", load_space(ROOT / "search_spaces" / "tiny_wsd.yaml",
                  {"optim.batch_size": 8, "optim.warmup_steps": 10}), Objective.parse("val_loss")).check()  # fmt: skip
    # A 10-step run with a 10-step warmup never decays (its last step is still warming up): no branch ends it.
    with pytest.raises(ConfigError, match="budget.durations_tokens: 20480 tokens .* start at step 9, inside the warm"):
        SweepPlan("x", "unused", load_space(ROOT / "search_spaces" / "tiny_wsd.yaml", {"optim.warmup_steps": 10}),
                  Objective.parse("val_loss")).check()  # fmt: skip


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
    from minimind.tune.plan import Objective

    mix = Objective.parse("continuation_accuracy=1, val_loss=-0.5")
    assert mix.mode == "max" and mix({"continuation_accuracy": 0.5, "val_loss": 3.0}) == pytest.approx(-1.0)
    assert mix({"val_loss": 3.0}) is None  # a row without the evaluation is no result
    assert Objective.parse("val_perplexity").mode == "min"
    with pytest.raises(ConfigError, match="unknown metric 'val_perplexty'"):
        Objective.parse("val_perplexty")


# An FFN of 2^31 units cannot be allocated (512 GiB per matrix): a trial that runs out of memory.
FAILING_SWEEP = (
    TINY_SWEEP.replace(
        "  optim.batch_size: {choice: [4, 8, 16]}\n",
        "  optim.batch_size: {choice: [4, 8, 16]}\n  model.intermediate_size: {choice: [null, 2147483648]}\n",
    ).replace("optim.batch_size: 8}", "optim.batch_size: 8, model.intermediate_size: null}")
    + "  - {optim.lr: 1.0e-2, optim.batch_size: 16, model.intermediate_size: 2147483648}  # out of memory\n"
)


RESUMABLE_SWEEP = TINY_SWEEP.replace("max_tokens: 5120", "max_tokens: 8192").split("points:")[0]


def wait_until(condition, process, what: str, timeout: float = 240):
    deadline = time.time() + timeout
    while not (found := condition()):
        assert process.poll() is None, f"the sweep ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return found


def trials_in(sweep_dir, *statuses) -> set[str]:
    return {tid for tid, t in trial_records(sweep_dir).items() if t["status"] in statuses}


def checkpointed_running(sweep_dir) -> str | None:
    """A trial training past its first checkpoint, if any."""
    return next((tid for tid in trials_in(sweep_dir, "running") if (sweep_dir / "trials" / tid / "latest").exists()),
                None)  # fmt: skip


def waiting_and_running(sweep_dir):
    """(the trials waiting at a rung, a trial training past its first checkpoint) or None."""
    waiting, running = trials_in(sweep_dir, "waiting"), checkpointed_running(sweep_dir)
    return (waiting, running) if waiting and running else None


def kill_sweep(process, ray_cluster, how=signal.SIGKILL):
    process.send_signal(how)
    process.wait(timeout=180)
    deadline = time.time() + 60  # the driver owned its trials: wait for their workers to go
    while train_workers(ray_cluster) and time.time() < deadline:
        time.sleep(0.5)


# The failing sweep at the resumable budget, with one rung (4096 tokens): the baseline, a point that diverges at
# once, one too big for memory, and two sampled trials, two at a time.
STOPPED_SWEEP = FAILING_SWEEP.replace("max_tokens: 5120", "max_tokens: 8192").replace(
    "grace_tokens: 2560", "grace_tokens: 4096"
)


EPOCH_SWEEP = """\
stage: sft
recipe: recipes/tiny/sft.yaml
objective: val_loss
budget: {{grace_tokens: 3000, reduction_factor: 2}}
overrides:
  data.train_files: [{data}]
  data.seq_len: 128
  optim.schedule: wsd
  optim.warmup_steps: 1
  eval.val_fraction: 0.1
  eval.max_examples: 8
  eval.continuation_docs: 0
  logging.every_steps: 4
params:
  optim.lr: {{loguniform: [1.0e-3, 1.0e-2]}}
  optim.batch_size: {{choice: [16, 8]}}
  optim.epochs: {{choice: [1, 2]}}
"""


def test_a_wsd_sweep_over_epochs_judges_cooled_values_and_reports_each_length_from_one_run(ray_cluster, tmp_path):
    """End to end on SFT data, whose padding leaves real tokens short of the budget's: each trial trains 2 epochs
    once; its readings at the rungs (what ASHA judges) are cooldown branches; the report's 1-epoch column is the
    branch that is a 1-epoch run's decay, the 2-epoch column the run's end; best.yaml is the best of those, as a
    plain run."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join((SAMPLE / "sft.jsonl").read_text(encoding="utf-8").splitlines(True)[:160]))
    space = write_space(tmp_path, EPOCH_SWEEP.format(data=data))
    done = subprocess.run([sys.executable, "ray_jobs/tune.py", "--space", str(space), "--num-samples", "2",
                           "--name", "sweep", "--storage-path", str(tmp_path), "--max-concurrent", "2",
                           "--no-early-stopping"],  # both trials to the end (ASHA's own runs are tested above)
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    sweep_dir = tmp_path / "sweep"
    report = (sweep_dir / "report.md").read_text()
    readings = {}
    for tid, trial in trial_records(sweep_dir).items():
        rows = [row for row in metrics(sweep_dir / "trials" / tid) if "val_loss" in row]
        assert rows[-1]["tokens"] < rows[-1]["budget_tokens"]  # padding: real tokens fall short
        for row in rows[:-1] if trial["status"] == "finished" else rows:
            if row["step"] * 2 <= rows[-1]["step"] or trial["status"] != "finished":
                assert row["cooldown_steps"] > 0 and row["val_loss"] != row["val_loss_stable"]  # judged cooled
        if trial["status"] != "finished":
            continue
        epoch = rows[-1]["step"] // 2  # 2 epochs trained: the loop's own epoch
        one = min((row for row in rows if row.get("cooldown_steps")),
                  key=lambda row: abs(row["step"] + row["cooldown_steps"] - epoch))  # fmt: skip
        assert abs(one["step"] + one["cooldown_steps"] - epoch) <= 1
        readings[tid] = (one["val_loss"], rows[-1]["val_loss"])
        assert f"| {tid} | finished | {one['val_loss']:.4g} | {rows[-1]['val_loss']:.4g} |" in report
    assert readings and "| trial | status | 1 epoch (" in report
    value, best_id, epochs = min((v, tid, e) for tid, pair in readings.items() for e, v in zip((1, 2), pair))
    best = load_yaml(sweep_dir / "best.yaml")
    assert f"Best trial {best_id} of sweep sweep: val_loss = {value:.6g}" in (sweep_dir / "best.yaml").read_text()
    assert best["optim"]["epochs"] == epochs and best["eval"]["cooldown_durations"] == []


def test_a_sweep_fails_its_bad_trials_exits_130_when_stopped_at_a_rung_resumes_and_reports_a_best_config_that_runs(
    ray_cluster, tmp_path
):
    space = write_space(tmp_path, STOPPED_SWEEP)
    sweep_dir, journal = tmp_path / "sweep", tmp_path / "study.log"
    start = [sys.executable, "ray_jobs/tune.py", "--space", str(space), "--num-samples", "5", "--name", "sweep",
             "--storage-path", str(tmp_path), "--optuna-storage", str(journal), "--max-concurrent", "2",
             "--seed", "1"]  # fmt: skip
    resume = [sys.executable, "ray_jobs/tune.py", "--resume", str(sweep_dir)]
    run_files = lambda tid: (sweep_dir / "trials" / tid / "metrics.jsonl").read_bytes()  # noqa: E731

    # Stopped (Ctrl-C) while a trial waits, paused, at its first rung and another trains past its first
    # checkpoint. Tune saves its state and returns; the command must still say that the sweep is not done, in
    # its exit status too (a script driving it would otherwise go on as if it were). A sweep's driver killed
    # outright (an experiment's job, its sweep step running) is in tests/test_cluster_flow.py.
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(start, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        waiting, interrupted = wait_until(lambda: waiting_and_running(sweep_dir), first,
                                          "a trial waiting at a rung beside a checkpointed one")  # fmt: skip
        kill_sweep(first, ray_cluster, how=signal.SIGINT)
    out = (tmp_path / "first.log").read_text()
    assert first.returncode == 130, out[-3000:]
    assert f"trials ended; finish it with: python ray_jobs/tune.py --resume {sweep_dir}" in out, out[-3000:]
    # Trials that had ended stay as they were (one failed for lack of memory is retried: trial.already_ended).
    kept = {tid: run_files(tid) for tid in trials_in(sweep_dir, "finished", "pruned")}

    done = subprocess.run(resume, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "[sweep] 5/5 trials done" in done.stdout, done.stdout[-3000:]

    trials = trial_records(sweep_dir)
    pruned = pruned_trials(str(sweep_dir))
    assert len(trials) == 5 and waiting <= set(trials)
    baseline = [t for t in trials.values() if t["baseline"]]
    recipe_values = {"optim.lr": 1e-2, "optim.batch_size": 16, "model.intermediate_size": None}
    assert [t["params"] for t in baseline] == [recipe_values]
    [diverged] = [t for t in trials.values() if t["params"]["optim.lr"] == 1e30]
    assert diverged["status"] == "failed" and "NaN/inf" in diverged["reason"]
    # The point too big for memory, and any sampled trial that drew its size, fail before any worker starts.
    too_big = [t for t in trials.values() if t["params"]["model.intermediate_size"]]
    assert too_big and all(t["status"] == "failed" and t["reason"].startswith("out of memory: ") for t in too_big)
    assert all("fp32 weights alone take" in t["reason"] for t in too_big)  # said by the trial, not a worker
    good = {tid: t for tid, t in trials.items() if t["status"] != "failed"}
    assert len(good) == 5 - 1 - len(too_big) and all(t["status"] == "finished" or tid in pruned
                                                      for tid, t in good.items()), trials  # fmt: skip
    for tid, before in kept.items():
        assert run_files(tid) == before, f"trial {tid} had ended and was trained again"
    # The interrupted trial continued from its checkpoint, not from scratch: its first logged step ran once.
    steps = [row["step"] for row in metrics(sweep_dir / "trials" / interrupted)]
    assert steps.count(steps[0]) == 1
    finished = {tid: t for tid, t in good.items() if t["status"] == "finished"}
    assert finished and all(metrics(sweep_dir / "trials" / tid)[-1]["tokens"] == 8192 for tid in finished)

    report = (sweep_dir / "report.md").read_text()
    assert "Trials asked for: 5; recorded: 5" in report and all(f"\n| {tid}" in report for tid in trials)
    assert diverged["reason"] in report and all(t["reason"][:60] in report for t in too_big)
    best_id = min(finished, key=lambda tid: metrics(sweep_dir / "trials" / tid)[-1]["val_perplexity"])
    assert f"Best trial: `{best_id}`" in report
    html = (sweep_dir / "report.html").read_text()
    # Objective per trial and loss curves inline (parallel coordinates and importance need more finished
    # trials; tests/test_tune_report.py checks them).
    assert html.count("data:image/png;base64,") >= 2 and "<script src" not in html

    # Optuna's own tools open the study: the baseline first, the bad trials failed, none left running.
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name="sweep", storage=storage)
    states = [t.state for t in study.trials]
    assert len(states) == 5 and study.trials[0].params == baseline[0]["params"]
    failed = optuna.trial.TrialState.FAIL
    assert states.count(failed) == 1 + len(too_big) and optuna.trial.TrialState.COMPLETE in states, states
    assert optuna.trial.TrialState.RUNNING not in states

    # best.yaml is the best trial's configuration (its own record of what it ran) but for where it writes, the
    # trial's rung steps (evaluated and checkpointed for ASHA) and its data files resolved for the workers. It runs
    # as is in tests/test_cluster_flow.py (an experiment's train step from a sweep's best).
    def flat(path):
        return flatten_dict(dataclasses.asdict(build_config(load_yaml(path))), delimiter=".")

    best, ran = flat(sweep_dir / "best.yaml"), flat(sweep_dir / "trials" / best_id / "config.yaml")
    differ = {k for k in best if best[k] != ran[k]}
    assert differ <= {"checkpoint.dir", "checkpoint.at_steps", "eval.at_steps", "data.train_files"}, differ
    assert [str(ROOT / path) for path in best["data.train_files"]] == ran["data.train_files"]


def test_the_same_sweep_command_again_resumes_it_and_a_different_one_is_refused(tmp_path):
    from minimind.tune.launch import record_sweep, settings_from_args

    space = write_space(tmp_path, RESUMABLE_SWEEP)
    command = ["--space", str(space), "--num-samples", "3", "--name", "sweep", "--storage-path", str(tmp_path)]
    settings, resume = settings_from_args(command)
    assert not resume
    # TPE models from the 3rd result on (Optuna's default waits for 10, leaving small sweeps random),
    # one joint density over all parameters.
    from minimind.tune.search import optuna_sampler

    sampler = optuna_sampler(settings, None)
    assert (sampler._n_startup_trials, sampler._multivariate, sampler._group) == (3, True, True)
    record_sweep(settings)
    assert settings_from_args(command) == (settings, True)
    assert settings_from_args(["--resume", str(tmp_path / "sweep")]) == (settings, True)
    with pytest.raises(ConfigError, match=r"different sweep \(num_samples: 3 there, 4 now\); .*--resume"):
        settings_from_args([*command[:3], "4", *command[4:]])
    with pytest.raises(ConfigError, match=r"cli_overrides: \{\} there, \{'optim.lr': 0.001\} now"):
        settings_from_args([*command, "--optim.lr", "0.001"])
    space.write_text(RESUMABLE_SWEEP.replace("1.0e-3, 3.0e-2", "1.0e-3, 1.0e-2"))
    with pytest.raises(ConfigError, match=rf"the contents of {space} changed since the sweep started"):
        settings_from_args(command)


class OneSearcher(Searcher):
    """A searcher whose suggestions are empty configs: what the limiter wraps in these tests."""

    def suggest(self, trial_id):
        return {}


class SweepState:
    """What TokenASHA sees of Tune's controller: the trials, whether the searcher made its last one,
    and the limiter; ``stop_trial`` stops a paused trial as Tune does (the scheduler is told).

    For the rule's cases that need results of concurrent trials in a set order: a real sweep fixes
    the order only when it runs one trial at a time (the real-Tuner test of the rule below)."""

    def __init__(self, scheduler, max_concurrent: int = 2):
        from minimind.tune.asha import SweepLimiter

        self.scheduler, self.trials, self.done = scheduler, {}, False
        self.limiter = SweepLimiter(OneSearcher(), max_concurrent=max_concurrent)
        self.search_alg = SimpleNamespace(is_finished=lambda: self.done, searcher=self.limiter)

    def get_trials(self):
        return list(self.trials.values())

    def stop_trial(self, trial):
        trial.status = "TERMINATED"
        self.scheduler.on_trial_remove(self, trial)

    def start(self, trial_id):
        assert self.limiter.suggest(trial_id) is not None, f"the limiter refused {trial_id}"
        self.trials[trial_id] = SimpleNamespace(trial_id=trial_id, status="RUNNING")
        self.scheduler.on_trial_add(self, self.trials[trial_id])

    def result(self, trial_id, tokens, perplexity):
        decision = self.scheduler.on_trial_result(
            self, self.trials[trial_id], {"tokens": tokens, "objective": perplexity}
        )
        if decision == "PAUSE":
            self.trials[trial_id].status = "PAUSED"
        elif decision == "STOP":
            self.trials[trial_id].status = "TERMINATED"
        return decision


def test_a_trial_waiting_at_a_rung_stops_when_the_last_trial_that_could_reach_it_fails(tmp_path):
    """Tune tells the scheduler of a trial's error (or end) before it marks the trial ended. The rung is complete
    then: a trial waiting there below its best share must stop, or the sweep waits for it forever (a resumed
    sweep did, its last other trial out of memory)."""
    scheduler = token_asha(tmp_path)
    state = SweepState(scheduler, max_concurrent=3)
    for trial_id in "abc":
        state.start(trial_id)
    state.done = True
    assert state.result("a", 2560, 90.0) == "PAUSE"  # alone at the rung, which b and c may still reach
    assert state.result("b", 2560, 80.0) == "CONTINUE"
    ended, failed = state.trials["b"], state.trials["c"]
    scheduler.on_trial_complete(state, ended, {})  # as Tune: told while the trial is still RUNNING, then marked
    ended.status = "TERMINATED"
    assert state.trials["a"].status == "PAUSED"  # c may still reach the rung
    scheduler.on_trial_error(state, failed)
    failed.status = "ERROR"
    assert state.trials["a"].status == "TERMINATED" and scheduler.pruned == {"a"}


def test_a_trial_stopped_while_waiting_at_a_rung_reaches_optuna_with_its_last_value():
    """Ray stops a paused trial with no result (``stop_trial`` -> ``on_trial_complete(trial_id)``): the limiter
    gives Optuna the value it paused with, so TPE models it as it does a trial stopped while running."""
    from optuna.trial import TrialState
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from minimind.tune.asha import SweepLimiter

    searcher = OptunaSearch(space={"x": tune.uniform(0, 1)}, metric="objective", mode="min", seed=0)
    limiter = SweepLimiter(searcher, max_concurrent=2)
    assert limiter.suggest("a") and limiter.suggest("b")
    limiter.pause("a", {"objective": 90.0})
    limiter.on_trial_complete("a")
    limiter.on_trial_complete("b", {"objective": 80.0})
    assert [(t.state, t.value) for t in searcher._ot_study.trials] == [(TrialState.COMPLETE, 90.0),
                                                                        (TrialState.COMPLETE, 80.0)]  # fmt: skip


def token_asha(tmp_path, early_stopping=True):
    from minimind.tune.asha import TokenASHA
    from minimind.tune.plan import Objective, SweepPlan

    space = load_space(write_space(tmp_path, RESUMABLE_SWEEP))  # rungs at 2,560 and 5,120 tokens; factor 2
    plan = SweepPlan("s", str(tmp_path), space, Objective.parse("val_perplexity"))
    return TokenASHA(plan, early_stopping=early_stopping)


class ScriptedTrials(Searcher):
    """Suggests the named trials in order (config ``{"name": ...}``), then no more."""

    def __init__(self, names: str):
        super().__init__(metric="objective", mode="min")
        self.names = list(names)

    def suggest(self, trial_id):
        return {"name": self.names.pop(0)} if self.names else Searcher.FINISHED

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass  # the scripts decide nothing from results


def test_asha_in_a_real_sweep_promotes_only_a_rungs_best_and_a_waiting_trial_frees_its_slot(ray_cluster, tmp_path):
    """A trial goes past a rung only while it ranks among the best floor(n / factor) of the n results
    there; otherwise it waits, paused, and its slot goes to a new trial. Once no trial can reach the
    rung, the best max(1, floor(n / factor)) go on from where they waited and the others stop.

    A real Tuner with the sweep's scheduler and limiter, one trial at a time so the order of
    arrival is fixed; each trial reports scripted evaluations instead of training."""
    from ray import tune

    from minimind.tune.asha import SweepLimiter, TokenASHA
    from minimind.tune.plan import Objective, SweepPlan
    from minimind.tune.records import TrialFile, trial_ids

    space = load_space(write_space(tmp_path, RESUMABLE_SWEEP))  # rungs at 2,560 and 5,120 tokens; factor 2
    plan = SweepPlan("sweep", str(tmp_path / "sweep"), space, Objective.parse("val_perplexity"))
    scripts = {  # (tokens, val perplexity) per evaluation, to the budget of 8,192 tokens
        "a": [(1280, 99.0), (2560, 90.0), (5120, 50.0), (8192, 40.0)],
        "b": [(1280, 98.0), (2560, 80.0), (5120, 60.0), (8192, 55.0)],
        "c": [(1280, 97.0), (2560, 85.0), (5120, 50.0), (8192, 40.0)],
        "d": [(1280, 96.0), (2560, 70.0), (5120, 65.0), (8192, 60.0)],
    }

    def scripted_trial(config):
        """Reports the trial's evaluations from where its metrics end, as a Train run goes on from
        its checkpoint: a trial promoted after waiting at a rung continues past it."""
        trial_id = tune.get_context().get_trial_id()
        path, record = os.path.join(plan.trial_dir(trial_id), "metrics.jsonl"), TrialFile(plan.trial_dir(trial_id))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        found = record.read()  # as run_trial: the record, marked running (noting what it found)
        record.write({**found, "trial_id": trial_id, "status": "running", "attempt_started_at": time.time(),
                      "found": [*found.get("found", []), found.get("status")]})  # fmt: skip
        done = len(open(path).readlines()) if os.path.exists(path) else 0
        for tokens, perplexity in scripts[config["name"]][done:]:
            with open(path, "a") as rows:
                rows.write(json.dumps({"name": config["name"], "tokens": tokens, "val_perplexity": perplexity}) + "\n")
            tune.report({"tokens": tokens, "objective": perplexity})
        record.write({**record.read(), "status": "finished"})

    tuner = tune.Tuner(
        tune.with_resources(scripted_trial, {"CPU": 0.01}),
        tune_config=tune.TuneConfig(
            search_alg=SweepLimiter(ScriptedTrials("abcd"), max_concurrent=1),
            scheduler=TokenASHA(plan),
            num_samples=4,
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(name="sweep", storage_path=str(tmp_path), verbose=0),
    )
    results = tuner.fit()
    assert not results.errors, results.errors

    name = {tid: metrics(tmp_path / "sweep" / "trials" / tid)[0]["name"] for tid in trial_ids(plan.sweep_dir)}
    decisions = [
        (name[row["trial_id"]], row["decision"], row.get("rung", row.get("tokens")))
        for row in asha_decisions(plan.sweep_dir)
    ]
    assert decisions == [
        ("a", "pause", 2560),  # alone at the rung: no evidence to go on; its slot goes to b
        ("b", "promote", 2560),  # best of two: the best half
        ("b", "pause", 5120),  # alone at the second rung
        ("c", "pause", 2560),  # second of three: the best half is b
        ("d", "promote", 2560),  # best of four: the best half is d and b, and no trial can reach the rung now
        ("a", "stop", 2560),  # so the others waiting there stop, however well they would have gone on
        ("c", "stop", 2560),
        ("d", "stop", 5120),  # behind b at the second rung, which no other trial can reach
        ("b", "promote", 5120),  # goes on from where it waited
    ], decisions
    trained = {name[tid]: [row["tokens"] for row in metrics(tmp_path / "sweep" / "trials" / tid)] for tid in name}
    assert trained == {"a": [1280, 2560], "b": [1280, 2560, 5120, 8192], "c": [1280, 2560], "d": [1280, 2560, 5120]}
    assert set(pruned_trials(plan.sweep_dir)) == {tid for tid in name if name[tid] != "b"}
    # The trials' records say so: b found itself marked waiting when it was resumed; the others pruned.
    records = {name[tid]: TrialFile(plan.trial_dir(tid)).read() for tid in name}
    assert {n: (r["status"], r["found"]) for n, r in records.items()} == {
        "a": ("pruned", [None]),
        "b": ("finished", [None, "waiting"]),
        "c": ("pruned", [None]),
        "d": ("pruned", [None]),
    }

    # A restored sweep's scheduler rebuilds the same rungs and decisions from these records.
    restored = TokenASHA(plan)
    restored.on_trial_add(None, None)
    by_name = lambda rung: {name[tid]: value for tid, value in rung.items()}  # noqa: E731
    assert [by_name(rung) for rung in restored.rungs] == [{"a": 90.0, "b": 80.0, "c": 85.0, "d": 70.0},
                                                           {"b": 60.0, "d": 65.0}]  # fmt: skip
    assert by_name(restored.passed) == {"b": 2, "d": 1} and {name[tid] for tid in restored.pruned} == {"a", "c", "d"}


def test_a_promoted_trial_stops_once_its_rung_holds_better_ones_unless_early_stopping_is_off(tmp_path):
    asha = token_asha(tmp_path)
    sweep = SweepState(asha, max_concurrent=5)
    for trial_id in "abcd":
        sweep.start(trial_id)
    assert [sweep.result(t, 2560, v) for t, v in zip("abcd", (90.0, 80.0, 95.0, 97.0))] == [
        "PAUSE", "CONTINUE", "PAUSE", "PAUSE"]  # fmt: skip
    assert asha.choose_trial_to_run(sweep) is sweep.trials["a"]  # with four results the best half is b and a
    sweep.start("e")
    assert sweep.result("e", 2560, 10.0) == "CONTINUE"
    sweep.start("f")
    assert sweep.result("f", 2560, 20.0) == "CONTINUE"  # the best half of six: e, f, b; a fell out of it
    assert sweep.result("a", 3840, 50.0) == "PAUSE"  # its promotion suspended: it waits at the rung again
    sweep.start("g")
    assert sweep.result("g", 2560, 99.0) == "PAUSE"
    sweep.start("h")
    assert sweep.result("h", 2560, 98.0) == "PAUSE"  # eight results: the best half takes a back
    assert asha.choose_trial_to_run(sweep) is sweep.trials["a"]
    sweep.trials["a"].status = "RUNNING"
    sweep.start("i")
    assert sweep.result("i", 2560, 5.0) == "CONTINUE"  # a is fifth of nine: out again, and the rung is now complete
    sweep.done = True
    assert sweep.result("a", 5120, 40.0) == "STOP" and "a" in pruned_trials(str(tmp_path))

    (tmp_path / "relaxed").mkdir()
    relaxed = SweepState(token_asha(tmp_path / "relaxed", early_stopping=False), max_concurrent=4)
    for trial_id, perplexity in (("a", 90.0), ("b", 95.0), ("c", 99.0)):
        relaxed.start(trial_id)
        assert relaxed.result(trial_id, 2560, perplexity) == "CONTINUE"  # recorded, never held
    assert [dict(rung) for rung in relaxed.scheduler.rungs] == [{"a": 90.0, "b": 95.0, "c": 99.0}, {}]


def test_asha_rungs_and_decisions_are_rebuilt_from_the_trials_records(tmp_path):
    """A restored sweep's scheduler starts empty; replaying the recorded evaluations and decisions
    restores the rungs, the promotions and the stops, so a trial is judged as it would have been."""
    live = token_asha(tmp_path)
    sweep = SweepState(live, max_concurrent=4)
    recorded = {"a": [(2560, 90.0)], "b": [(2560, 80.0), (5120, 60.0)], "c": [(2560, 85.0)], "d": [(2560, 70.0)]}
    for trial_id, rows in recorded.items():
        sweep.start(trial_id)
        (tmp_path / "trials" / trial_id).mkdir(parents=True)
        lines = [json.dumps({"step": i, "tokens": t, "val_perplexity": v}) for i, (t, v) in enumerate(rows, 1)]
        (tmp_path / "trials" / trial_id / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        for tokens, perplexity in rows:
            sweep.result(trial_id, tokens, perplexity)
    sweep.done = True
    live.on_trial_complete(sweep, sweep.trials["d"], {})

    restored = token_asha(tmp_path)
    restored.on_trial_add(None, SimpleNamespace(trial_id="b"))  # replays the records
    assert restored.rungs == live.rungs and restored.passed == live.passed
    assert restored.pruned == live.pruned == {"a", "c"} and restored.best_recorded == (60.0, "b")
    again = SweepState(restored)
    again.trials = {t: SimpleNamespace(trial_id=t, status="PENDING") for t in recorded}
    assert again.result("a", 3840, 1.0) == "STOP"  # a stopped trial stays stopped
    assert again.result("d", 3840, 69.0) == "CONTINUE"  # promoted past the first rung before
    # A run's last evaluation is never a stop: the trial finished its budget.
    last = {"tokens": 5120, "objective": 99.0, "step": 8, "total_steps": 8}
    assert restored.on_trial_result(again, again.trials["d"], last) == "CONTINUE" and "d" not in restored.pruned


def test_the_searcher_does_not_run_a_config_twice():
    """TPE over a few choices redraws the same config; each repeat is told to Optuna with its
    twin's result (or as pruned while the twin runs) and another config is drawn instead."""
    from minimind.tune.search import DistinctOptunaSearch

    def space(trial):
        trial.suggest_categorical("optim.batch_size", [4, 8])
        trial.suggest_categorical("optim.lr", [1e-3, 3e-3])

    searcher = DistinctOptunaSearch(space=space, metric="objective", mode="min",
                                    sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=1))  # fmt: skip
    configs = [searcher.suggest("t0"), searcher.suggest("t1")]  # two running at once
    drawn_while_running = len(searcher._ot_study.trials)
    results = {"t0": 5.0, "t1": 7.0}
    for tid, value in results.items():
        searcher.on_trial_complete(tid, {"objective": value})
    configs += [searcher.suggest("t2"), searcher.suggest("t3")]
    assert len({json.dumps(c, sort_keys=True) for c in configs}) == 4  # the whole space, no repeat
    repeats = [t for t in searcher._ot_study.trials if "repeat_of" in t.user_attrs]
    assert repeats, "TPE drew no repeat: the test no longer exercises the redraw"
    for repeat in repeats:
        twin = repeat.user_attrs["repeat_of"]
        if repeat.number < drawn_while_running or twin not in results:
            assert repeat.state == optuna.trial.TrialState.PRUNED
        else:
            assert repeat.state == optuna.trial.TrialState.COMPLETE and repeat.value == results[twin]
    assert searcher.suggest("t4") in configs  # an exhausted space runs a repeat rather than nothing


PIPELINE_SWEEP = """\
stage: pretrain
recipe: recipes/tiny/pretrain.yaml
budget: {max_tokens: 5120}
overrides: {data.seq_len: 64, optim.warmup_steps: 2}
params:
  optim.lr: {loguniform: [1.0e-3, 3.0e-2]}
then:
  - stage: sft
    recipe: recipes/tiny/sft.yaml
    overrides: {data.seq_len: 128, optim.batch_size: 4, optim.max_steps: 6, optim.warmup_steps: 1,
                eval.val_fraction: 0.1, eval.max_examples: 8, eval.continuation_docs: 0, logging.every_steps: 3}
    params:
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
"""


def test_a_later_stages_bad_field_is_named_with_its_line(tmp_path):
    misspelt = PIPELINE_SWEEP.replace("optim.lr: {loguniform: [1.0e-4", "optim.lrr: {loguniform: [1.0e-4")
    path = write_space(tmp_path, misspelt)
    with pytest.raises(ConfigError, match=rf"^{path}:13: then\[0\]\.params\.optim\.lrr: .*did you mean 'lr'"):
        load_space(path)
    space = load_space(write_space(tmp_path, PIPELINE_SWEEP))
    assert space.baseline() == {"optim.lr": 1e-2, "sft/optim.lr": 5e-3}  # each stage's recipe value


def test_a_grid_lists_every_value_and_refuses_what_it_cannot_enumerate(tmp_path):
    space = load_space(write_space(tmp_path, TINY_SWEEP.split("points:")[0]))
    with pytest.raises(ConfigError, match=r"space\.yaml:\d+: params\.optim\.lr: a grid needs its values listed"):
        space.grid()
    gridded = TINY_SWEEP.split("points:")[0].replace("{loguniform: [1.0e-3, 3.0e-2]}", "{choice: [1.0e-3, 1.0e-2]}")
    gridded = gridded.replace("optim.batch_size: {choice: [4, 8, 16]}", "optim.warmup_steps: {int: [0, 4], step: 2}")
    path = write_space(tmp_path, gridded, "grid.yaml")
    assert load_space(path).grid() == {"optim.lr": [1e-3, 1e-2], "optim.warmup_steps": [0, 2, 4]}
    done = subprocess.run(
        [sys.executable, "ray_jobs/tune.py", "--space", str(path), "--sampler", "grid", "--num-samples", "5",
         "--storage-path", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"},
    )  # fmt: skip
    assert done.returncode == 2 and "the grid of" in done.stderr and "has 6 points, not 5" in done.stderr


def test_command_line_overrides_reach_the_stage_they_name(tmp_path):
    """Plain --field VALUE options set the sweep's own (first) stage, --STAGE/field a later one, as parameters
    are named; a stage the space lacks is refused."""
    space = write_space(tmp_path, PIPELINE_SWEEP)
    loaded = load_space(space, {"data.train_files": ["pre"], "sft/data.train_files": ["chat"]})
    assert loaded.base["data"]["train_files"] == ["pre"]
    assert [stage.base["data"]["train_files"] for stage in loaded.then] == [["chat"]]
    with pytest.raises(ConfigError, match=r"--dpo/optim\.lr: the space has no later stage 'dpo'"):
        load_space(space, {"dpo/optim.lr": 1e-4})


def test_a_trials_time_is_its_record_once_it_ended_or_waits_and_runs_on_from_its_last_metrics_while_running(tmp_path):
    from minimind.tune.records import wall_seconds_so_far

    (tmp_path / "metrics.jsonl").write_text("{}\n")
    written = os.path.getmtime(tmp_path / "metrics.jsonl")
    running = {"status": "running", "wall_seconds": 30.0, "attempt_started_at": written - 10.0}
    assert wall_seconds_so_far(running, [str(tmp_path)]) == pytest.approx(40.0)  # 30 before, 10 in this attempt
    for status in ("finished", "failed", "pruned", "waiting"):  # recorded when it ended or was paused, counted once
        assert wall_seconds_so_far({**running, "status": status, "wall_seconds": 40.0}, [str(tmp_path)]) == 40.0


TARGET_RECIPE = """\
stage: pretrain
model: {preset: tiny, hidden_size: 128, parametrization: mup, mup_base_width: 64}
data: {train_files: [data/sample/pretrain.jsonl], seq_len: 64}
optim: {lr: 1.0e-2, batch_size: 16, grad_accum_steps: 2, max_steps: 3, warmup_steps: 1}
eval: {val_fraction: 0.1, max_examples: 8, continuation_docs: 0}
"""
TARGET_SWEEP = """\
stage: pretrain
target: {target}
budget: {{max_tokens: 4096, grace_tokens: 1024, reduction_factor: 2}}
overrides:
  optim.batch_size: 8
  optim.grad_accum_steps: 1
  optim.schedule: wsd
  eval.cooldown_fraction: 0.25
{extra}params:
  optim.lr: {{loguniform: [1.0e-3, 3.0e-2]}}
  optim.decay_fraction: {{choice: [0.2, 0.5]}}
"""


def tiny_flops_per_token(width: int, seq_len: int) -> int:
    """6N + 12*L*d*T for the tiny preset (2 layers, 4 heads, 2 KV heads, vocabulary 6,400) at ``width``,
    counted by hand: the embedding (tied with the readout) once; per layer q and o (d x d), k and v
    (d x 2 heads x d/4), SwiGLU's three d x ffn (MiniMind's ffn: 64 * ceil(floor(8d/3) / 64)) and two
    norms; the final norm."""
    ffn = 64 * -(-(8 * width // 3) // 64)
    per_layer = 2 * width * width + 2 * width * (2 * width // 4) + 3 * width * ffn + 2 * width
    parameters = 6400 * width + 2 * per_layer + width
    return 6 * parameters + 12 * 2 * width * seq_len


def test_a_proxy_sweep_runs_the_base_width_and_writes_the_target_recipe_with_the_lr_scaled_to_its_batch(tmp_path):
    from minimind.config import load_config
    from minimind.train.loop import Trainer
    from minimind.tune.plan import Objective, SweepPlan
    from minimind.tune.report import TrialRecord
    from minimind.tune.results import transfer_lines, write_best_configs

    recipe = tmp_path / "target.yaml"
    recipe.write_text(f"{TARGET_RECIPE}checkpoint: {{dir: {tmp_path}/unused}}\n".replace("data/", f"{ROOT}/data/"))
    space = load_space(write_space(tmp_path, TARGET_SWEEP.format(target=recipe, extra="")))
    plan = SweepPlan("proxy", str(tmp_path / "sweep"), space, Objective.parse("val_perplexity"))
    plan.check()
    # The trials run the target's model at its base width, with the space's overrides.
    proxy = plan.trial_config({"optim.lr": 4e-3, "optim.decay_fraction": 0.5})
    assert (proxy.model.hidden_size, proxy.model.mup_base_width, proxy.model.num_layers) == (64, 64, 2)
    assert (proxy.optim.batch_size, proxy.optim.grad_accum_steps, proxy.optim.schedule) == (8, 1, "wsd")

    best = TrialRecord("t1", {"optim.lr": 4e-3, "optim.decay_fraction": 0.5}, "finished", 50.0, {}, 10_000, 1.0)
    (tmp_path / "sweep").mkdir()
    assert ("best-target.yaml", "pretrain") in write_best_configs(plan, best)
    written = tmp_path / "sweep" / "best-target.yaml"
    target = load_config(written)
    # 16 x 2 x 64 = 2,048 target tokens a step against the proxy's 8 x 64 = 512: lr x sqrt(4) = x 2. The
    # tuned schedule comes along; the target keeps its batch, length, warmup and width; no cooldown branches.
    assert target.optim.lr == pytest.approx(8e-3, rel=1e-12)
    assert (target.optim.schedule, target.optim.decay_fraction, target.eval.cooldown_fraction) == ("wsd", 0.5, 0.0)
    assert (target.optim.batch_size, target.optim.grad_accum_steps, target.optim.max_steps) == (16, 2, 3)
    assert (target.optim.warmup_steps, target.model.hidden_size, target.model.mup_base_width) == (1, 128, 64)
    assert "sqrt(2,048 / 512 tokens per step)" in written.read_text()
    # The report's cost, by hand: 10,000 proxy tokens against 3 steps x 2,048 tokens of the target.
    lines = transfer_lines(plan, [best], best)
    proxy_flops = 10_000 * tiny_flops_per_token(64, 64)
    target_flops = 3 * 2048 * tiny_flops_per_token(128, 64)
    assert f"{proxy_flops:.3g} FLOPs" in lines[-2] and f"{target_flops:.3g} FLOPs" in lines[-1]
    assert f"the sweep cost {proxy_flops / target_flops:.1%} of one target run" in lines[-1]
    # best-target.yaml is a run config as it is.
    target.checkpoint.dir = None
    assert Trainer(target).fit().steps == 3


MUP_TARGET_MODEL = "model: {preset: tiny, hidden_size: 128, parametrization: mup, mup_base_width: 64}"


@pytest.mark.parametrize(
    "model, extra, message",
    [
        ("model: {preset: tiny, hidden_size: 128}", "", r"target: model\.parametrization: a target is tuned"),
        ("model: {preset: tiny, hidden_size: 128, parametrization: mup}", "",
         r"target: model\.mup_base_width: the target's \(None\) must be set"),
        (MUP_TARGET_MODEL, "  model.num_kv_heads: 4\n",
         r"target: model\.num_kv_heads: the proxy has 4 and the target 2"),
        (MUP_TARGET_MODEL, "  model.mup_base_width: 32\n",
         r"target: model\.mup_base_width: the proxy \(mup, base 32\)"),
    ],
)  # fmt: skip
def test_a_target_no_proxy_transfers_to_is_refused_naming_the_field(tmp_path, model, extra, message):
    text = TARGET_RECIPE.replace(MUP_TARGET_MODEL, model).replace("data/", f"{ROOT}/data/")
    (tmp_path / "target.yaml").write_text(text)
    path = write_space(tmp_path, TARGET_SWEEP.format(target=tmp_path / "target.yaml", extra=extra))
    with pytest.raises(ConfigError, match=rf"^{path}:2: {message}"):
        load_space(path)
