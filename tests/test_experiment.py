"""Experiments as step graphs: the file checked whole before anything runs, outputs named by hashes that change
exactly where the graph changed, and leases that stop two invocations running one step."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SAMPLE
from ray_runs import finish, job, max_diff, metrics

from minimind.config import ConfigError, build_config, load_yaml
from minimind.experiment.graph import plan
from minimind.experiment.spec import load_experiment
from minimind.model.checkpoint import load_model, resolve_checkpoint

EXPERIMENT = f"""\
name: tiny
storage_path: {{storage}}
steps:
  pretrain_data:
    prepare: {{{{inputs: [{{corpus}}], seq_len: 64, val_fraction: 0.1}}}}
  sft_data:
    prepare: {{{{inputs: [{SAMPLE / "sft.jsonl"}], seq_len: 128}}}}
  pretrain:
    train:
      stage: pretrain
      recipe: {ROOT / "recipes/tiny/pretrain.yaml"}
      data: pretrain_data
      overrides: {{{{optim.max_steps: 4, optim.batch_size: 4}}}}
  sft:
    train:
      stage: sft
      recipe: {ROOT / "recipes/tiny/sft.yaml"}
      init_from: pretrain
      data: sft_data
      overrides:
        optim.max_steps: 4
        optim.lr: 1.0e-3
  eval:
    eval: {{{{checkpoint: sft, data: sft_data, continuation_docs: 2, max_new_tokens: 8, actors: 1}}}}
  export:
    export: {{{{checkpoint: pretrain}}}}
"""


def write(tmp_path, text: str, name: str = "experiment.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path):
    """A small pretrain corpus of its own (the hash covers its content)."""
    lines = (SAMPLE / "pretrain.jsonl").read_text(encoding="utf-8").splitlines()[:200]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def experiment_file(tmp_path, corpus, storage=None, **replace):
    text = EXPERIMENT.format(storage=storage or tmp_path / "runs", corpus=corpus)
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return write(tmp_path, text)


@pytest.mark.parametrize(
    ("replace", "line", "message"),
    [
        ({"    prepare: {inputs: [": "    prepair: {inputs: ["}, 5, "steps.pretrain_data.prepair: unknown step kind"),
        ({"data: pretrain_data": "data: pretrain_dta"}, 12, "steps.pretrain.train.data: 'pretrain_dta' is neither"),
        ({"init_from: pretrain": "init_from: sft_data"}, 18, "steps.sft.train.init_from: 'sft_data' is a prepare step"),
        ({"optim.lr: 1.0e-3": "optim.lr: -1.0"}, 22, "steps.sft.train.overrides.optim.lr: must be positive"),
        ({"optim.lr: 1.0e-3": "optim.lrr: 1.0"}, 22, "steps.sft.train.overrides.optim.lrr: unknown key"),
        ({"continuation_docs: 2,": "continuation_docs: two,"}, 24, "steps.eval.eval.continuation_docs: expected an"),
        ({"export: {checkpoint: pretrain}": "export: {checkpoint: pretrain, format: onnx}"}, 26,
         "steps.export.export.format: one of hf, minimind"),
        ({"      stage: sft\n": "      stage: sft\n      teacher: pretrain\n"}, 17,
         "steps.sft.train.teacher: only a distill step has a teacher"),
        ({"optim.max_steps: 4, optim.batch_size: 4}": "optim.max_steps: 4, data.seq_len: 128}"}, 13,
         "steps.pretrain.train.overrides: data.seq_len 128 differs from its data's seq_len 64"),
        ({"steps:\n": "overrides: {optim.lrr: 1.0}\nsteps:\n"}, 3, "overrides.optim.lrr: unknown key"),
        ({"    prepare: {inputs: [": f"    prepare: {{inputs: [{SAMPLE}, "}, 5,
         "steps.pretrain_data.prepare.inputs: '" + str(SAMPLE) + "' is a directory: name its files, or a glob"),
        ({"seq_len: 128}": f"seq_len: 128, tokenizer: {ROOT / 'tests/reference/minimind3_tokenizer'}}}"}, 19,
         "steps.sft.train.data: prepare step sft_data tokenizes with "),
        # A recipe that starts from a run outside the experiment (the 26M SFT recipe's runs/minimind-26m/pretrain).
        ({"recipes/tiny/sft.yaml": "recipes/minimind-26m/sft.yaml", "      init_from: pretrain\n": ""}, 14,
         "steps.sft.train.init_from: the recipe starts from 'runs/minimind-26m/pretrain'"),
        # A cycle: pretrain starts from sft, which starts from pretrain.
        ({"      data: pretrain_data\n": "      data: pretrain_data\n      init_from: sft\n"}, 8,
         "steps.pretrain: the steps form a cycle: pretrain -> sft -> pretrain"),
    ],
)  # fmt: skip
def test_a_bad_experiment_is_refused_naming_file_line_and_field(tmp_path, corpus, replace, line, message):
    path = experiment_file(tmp_path, corpus, **replace)
    with pytest.raises(ConfigError) as error:
        load_experiment(path)
    assert str(error.value).startswith(f"{path}:{line}: {message}"), str(error.value)


def test_the_shipped_experiments_are_valid(tmp_path, monkeypatch):
    """Checked from a copy of the repository's layout (their paths are relative to it, as the README runs
    them), with a few lines of the sample standing in for MiniMind's own corpora under data/minimind/. One
    setting puts the 26M experiment on GPUs, and its sweep is run again when a recipe its space names changes."""
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    for folder in ("search_spaces", "experiments"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sample").symlink_to(SAMPLE)
    stand_ins = {"pretrain_hq": "pretrain", "sft_mini_512": "sft", "dpo": "dpo", "r1_mix_1024": "r1"}
    (tmp_path / "data" / "minimind").mkdir()
    for name, sample in stand_ins.items():
        lines = (SAMPLE / f"{sample}.jsonl").read_text(encoding="utf-8").splitlines()[:3]
        (tmp_path / "data" / "minimind" / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    for path in sorted((ROOT / "experiments").glob("*.yaml")):
        experiment = load_experiment(path)
        assert experiment.order()[-1] in experiment.steps

    path = ROOT / "experiments" / "minimind2-26m.yaml"
    on_gpus = load_experiment(
        path, ["overrides.distributed.use_gpu=true", "pretrain.overrides.distributed.num_workers=8"]
    )
    assert on_gpus.steps["lr_sweep"].config["overrides"]["distributed.use_gpu"] is True
    for name in ("sft", "dpo", "reasoning"):
        assert on_gpus.steps[name].config["distributed"]["use_gpu"] is True
        assert on_gpus.steps[name].config["distributed"]["num_workers"] == 1  # pretrain's setting is its own
    assert on_gpus.steps["pretrain"].config["recipe_overrides"]["distributed.num_workers"] == 8
    assert all(on_gpus.steps[name].config["use_gpu"] for name in ("eval_sft", "eval_dpo", "eval_reasoning"))
    assert not load_experiment(path).steps["eval_sft"].config["use_gpu"]
    pipeline = load_experiment(ROOT / "experiments" / "sample-sweep.yaml", ["overrides.distributed.use_gpu=true"])
    assert pipeline.steps["sweep"].config["overrides"]["sft/distributed.use_gpu"] is True  # its SFT stage too

    before = {name: entry.hash for name, entry in plan(load_experiment(path)).items()}
    recipe = tmp_path / "recipes" / "minimind-26m" / "pretrain.yaml"
    recipe.write_text(recipe.read_text(encoding="utf-8").replace("warmup_steps: 100", "warmup_steps: 50"), "utf-8")
    after = {name: entry.hash for name, entry in plan(load_experiment(path)).items()}
    downstream = {"lr_sweep", "pretrain", "sft", "dpo", "reasoning", "eval_sft", "eval_dpo", "eval_reasoning"}
    assert {name for name in before if before[name] != after[name]} == downstream | {"export"}


def test_the_command_refuses_a_bad_file_before_ray_starts(tmp_path, corpus):
    path = experiment_file(tmp_path, corpus, **{"stage: pretrain": "stage: pretrian"})
    done = subprocess.run([sys.executable, "ray_jobs/experiment.py", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"config error: {path}:10: steps.pretrain.train.stage: required, one of pretrain, sft" in done.stderr


def test_hashes_change_exactly_downstream_of_what_changed_and_not_with_where_outputs_live(tmp_path, corpus):
    def hashes(path):
        return {name: entry.hash for name, entry in plan(load_experiment(path)).items()}

    base = hashes(experiment_file(tmp_path, corpus))
    sft = load_experiment(experiment_file(tmp_path, corpus)).steps["sft"]
    # What it sets, against recipes/tiny/sft.yaml (lr 5e-3; seq_len 256, but its data is packed at 128).
    expected = {"optim.lr: 0.005 -> 0.001", "data.seq_len: 256 -> 128", "checkpoint.init_from: None -> '${pretrain}'"}
    assert expected <= set(sft.changes), sft.changes
    # Scored on its data's held-out split, unless the prepare step holds none out.
    assert sft.config["eval"]["val_files"] == ["${sft_data}"]
    unheld = load_experiment(experiment_file(tmp_path, corpus, **{"seq_len: 128}": "seq_len: 128, val_fraction: 0}"}))
    assert unheld.steps["sft"].config["eval"]["val_files"] == []
    assert len(set(base.values())) == len(base)
    assert hashes(experiment_file(tmp_path, corpus)) == base  # read again: the same
    moved = hashes(experiment_file(tmp_path, corpus, storage=tmp_path / "elsewhere"))
    assert moved == base

    def changed(**replace):
        new = hashes(experiment_file(tmp_path, corpus, **replace))
        return {name for name in base if new[name] != base[name]}

    assert changed(**{"optim.lr: 1.0e-3": "optim.lr: 2.0e-3"}) == {"sft", "eval"}
    assert changed(**{"max_new_tokens: 8": "max_new_tokens: 16"}) == {"eval"}
    assert changed(**{"seq_len: 128}": "seq_len: 96}"}) == {"sft_data", "sft", "eval"}
    assert changed(**{"optim.max_steps: 4, optim.batch_size: 4": "optim.max_steps: 5, optim.batch_size: 4"}) == {
        "pretrain", "sft", "eval", "export"}  # fmt: skip
    # The command line's settings are those edits: the same hashes as the edited file.
    path = experiment_file(tmp_path, corpus)
    settings = ["sft.overrides.optim.lr=2.0e-3", "eval.max_new_tokens=16", f"storage_path={tmp_path / 'elsewhere'}"]
    set_on_the_command_line = {name: entry.hash for name, entry in plan(load_experiment(path, settings)).items()}
    edits = {"optim.lr: 1.0e-3": "optim.lr: 2.0e-3", "max_new_tokens: 8": "max_new_tokens: 16"}
    assert set_on_the_command_line == hashes(experiment_file(tmp_path, corpus, **edits)) != base
    path = experiment_file(tmp_path, corpus)
    for setting, message in [
        ("sft.overrides.optim.lr", "expected KEY=VALUE"),
        ("sfx.overrides.optim.lr=1", "no step 'sfx'"),
        ("eval.max_new_tokens.x=1", "only overrides take a dotted field"),
        ("sft.overrides.optim.lrr=1", r"steps\.sft\.train\.overrides.*optim\.lrr"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_experiment(path, [setting])
    # A start outside the experiment is pinned to the checkpoint it stands for: a newer one is another start.
    outside = tmp_path / "outside-run"
    (outside / "step_00000002").mkdir(parents=True)
    (outside / "step_00000002" / "model.json").write_text("{}")
    started = {
        "      init_from: pretrain\n": "",
        "        optim.lr: 1.0e-3\n": f"        optim.lr: 1.0e-3\n        checkpoint.init_from: {outside}\n",
    }
    pinned = load_experiment(experiment_file(tmp_path, corpus, **started)).steps["sft"]
    assert pinned.config["checkpoint"]["init_from"] == str(outside / "step_00000002")
    before = hashes(experiment_file(tmp_path, corpus, **started))
    (outside / "step_00000004").mkdir()
    (outside / "step_00000004" / "model.json").write_text("{}")
    after = hashes(experiment_file(tmp_path, corpus, **started))
    assert {name for name in before if before[name] != after[name]} == {"sft", "eval"}
    # The corpus's content, not its name or time, is what a prepare step's hash covers.
    text = corpus.read_text(encoding="utf-8")
    os.utime(corpus, (time.time() + 100, time.time() + 100))
    assert hashes(experiment_file(tmp_path, corpus)) == base
    corpus.write_text(text.replace("。", "，", 1), encoding="utf-8")
    assert changed() == {"pretrain_data", "pretrain", "sft", "eval", "export"}


def test_a_dry_run_says_what_would_run_and_why_and_writes_nothing(tmp_path, corpus):
    from minimind.experiment.graph import DONE_FILE

    path = experiment_file(tmp_path, corpus)
    experiment = load_experiment(path)
    planned = plan(experiment)
    # pretrain_data as if a run had finished it, and a record of the last run with sft's old learning rate.
    done = planned["pretrain_data"]
    os.makedirs(done.output)
    (tmp_path / "runs" / "tiny" / done.output.rsplit("/", 1)[1] / DONE_FILE).write_text(json.dumps({"hash": done.hash}))
    record = {"steps": {name: {"hash": e.hash, "identity": e.identity} for name, e in planned.items()}}
    (tmp_path / "runs" / "tiny" / "experiment.json").write_text(json.dumps(record, default=str))
    path = experiment_file(tmp_path, corpus, **{"optim.lr: 1.0e-3": "optim.lr: 2.0e-3"})
    before = sorted(str(p) for p in tmp_path.rglob("*"))

    out = subprocess.run([sys.executable, "ray_jobs/experiment.py", str(path), "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    lines = {line.split(" [")[0].strip(): line for line in out.splitlines() if line.startswith("  ")}
    assert "cached: its output is complete" in lines["pretrain_data"]
    assert "would run: not run yet" in lines["pretrain"]
    assert "would run: config changed: optim.lr: 0.001 -> 0.002" in lines["sft"]
    assert "would run: new output of sft" in lines["eval"]
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_two_writers_of_one_file_never_tear_it_nor_fail(tmp_path):
    """experiment.json and index.html are rewritten by each invocation, two of which may run at once."""
    import threading

    from minimind import storage

    path, errors = tmp_path / "experiment.json", []

    def write(writer: int):
        try:
            for count in range(300):
                storage.write_text(path, json.dumps({"writer": writer, "count": count, "pad": "x" * 4096}))
                assert json.loads(path.read_text())["count"] >= 0  # whole, whoever wrote it last
        except Exception as error:  # noqa: BLE001 - any failure of a writer fails the test
            errors.append(error)

    writers = [threading.Thread(target=write, args=(n,)) for n in range(2)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    assert errors == [] and not list(tmp_path.glob(".*.tmp"))


def test_a_lease_is_held_by_one_invocation_and_taken_over_when_its_holder_stopped(tmp_path, monkeypatch):
    import socket

    from minimind.experiment import runner

    output = str(tmp_path / "step-abc")
    first = runner.Lease(output, f"{socket.gethostname()}:{os.getpid()}:first")
    second = runner.Lease(output, f"{socket.gethostname()}:{os.getpid()}:second")
    assert first.try_take() and not second.try_take()
    assert first.renew()
    # A renewal that fails (the storage hiccups: here the lease's path is a folder for one beat) neither ends the
    # heartbeat nor loses the lease: the next beat renews it.
    lease_file, lost = Path(f"{output}.lease"), []
    renewed = first.holder()[1]
    lease_file.unlink()
    lease_file.mkdir()
    runner.renew_leases([first], lost)
    lease_file.rmdir()
    runner.renew_leases([first], lost)
    assert lost == [] and first.holder()[0] == first.owner and first.holder()[1] > renewed
    assert not second.try_take()
    # Not renewed for longer than STALE_S: its holder is taken to be gone.
    monkeypatch.setattr(runner, "STALE_S", 0.0)
    assert second.try_take() and second.holder()[0] == second.owner
    # The old holder, back, does not overwrite the lease it lost.
    assert not first.renew() and second.holder()[0] == second.owner
    monkeypatch.setattr(runner, "STALE_S", 60.0)
    second.release()
    # Held by a process of this machine that has ended: taken at once.
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = runner.Lease(output, f"{socket.gethostname()}:{ended.stdout.strip()}:gone")
    assert gone.try_take()
    assert second.try_take()
    assert second.holder()[0] == second.owner
    second.release()
    # Held by a process of another machine (whose process ids say nothing here): only a heartbeat older than
    # STALE_S frees it, however dead the same process id is on this machine.
    for age, taken in ((runner.STALE_S - 5, False), (runner.STALE_S + 1, True)):
        other = f"{socket.gethostname()}-other:{ended.stdout.strip()}:elsewhere"
        lease_file.write_text(json.dumps({"owner": other, "renewed": time.time() - age, "host": "other"}))
        assert second.try_take() is taken and second.holder()[0] == (second.owner if taken else other)


def test_the_readme_job_twice_at_once_one_killed_runs_each_step_once_then_none_and_the_other_stages_follow(
    ray_cluster, tmp_path
):
    """The README's main job, ``scripts/run_sample.sh --smoke`` (experiments/sample.yaml at 24 steps a stage), on
    the test cluster, started twice at once: each step runs in one of them (its lease), and the one training
    pretrain is killed once pretrain has a checkpoint; the other takes the step over and resumes it from the
    checkpoint. Then a run runs none, and an SFT override would run only SFT and what follows it. Meanwhile each
    other entry point runs from the job's models."""
    from minimind.eval.samples import CHAT_PROMPTS, CONTINUATION_PROMPTS
    from minimind.experiment.launch import main
    from minimind.model.hf import import_hf

    out = tmp_path / "out"
    root = out / "sample"
    command = ["bash", "scripts/run_sample.sh", str(out), "--smoke"]
    popen = dict(cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    twice = [subprocess.Popen(command, **popen) for _ in range(2)]
    deadline = time.time() + 300
    while not (checkpointed := list(root.glob("pretrain-*/latest"))):
        assert all(p.poll() is None for p in twice) and time.time() < deadline, twice[0].communicate()[0][-3000:]
        time.sleep(0.2)
    pretrain_dir = checkpointed[0].parent
    # The lease names the experiment driver that holds the step; kill its script's session (script and driver).
    holder_pid = int(json.loads(Path(f"{pretrain_dir}.lease").read_text())["owner"].split(":")[1])
    [killed] = [p for p in twice if os.getpgid(holder_pid) == p.pid]
    [survivor] = [p for p in twice if p is not killed]
    os.killpg(killed.pid, signal.SIGKILL)
    killed_out = killed.communicate()[0]
    survivor_out = survivor.communicate(timeout=600)[0]
    assert survivor.returncode == 0, survivor_out[-3000:]

    def started(output: str) -> list[str]:  # (Ray Data's progress bars may share a line with these)
        return re.findall(r"\[experiment\] (\w+): running ", output)

    # Every step ran in one invocation, except those the killed one was running: the survivor took them over.
    cut_short = {name for name in started(killed_out) if f"[experiment] {name}: done" not in killed_out}
    everything = started(killed_out) + started(survivor_out)
    assert "pretrain" in cut_short, killed_out[-3000:]
    assert {"pretrain", "sft", "eval", "export"} <= set(started(survivor_out)), survivor_out[-3000:]
    assert sorted(everything) == sorted([*set(everything), *cut_short]), (killed_out[-2000:], survivor_out[-2000:])
    # Pretrain went on from a checkpoint (step 8 or 16; a row every 4 steps), not from scratch: its rows up to the
    # kill, then from the first after that checkpoint to the end.
    steps = [row["step"] for row in metrics(pretrain_dir)]
    assert steps.count(4) == 1 and steps[-1] == 24, steps
    back = next((i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), None)
    if back is None:  # killed just after a checkpoint's row: resumed where the rows stop
        assert steps == list(range(4, 25, 4)), steps
    else:
        before_kill, resumed = steps[:back], steps[back:]
        assert before_kill == list(range(4, before_kill[-1] + 1, 4)), steps
        assert resumed == list(range(resumed[0], 25, 4)) and resumed[0] - 4 in (8, 16), steps
        assert resumed[0] - 4 <= before_kill[-1], steps

    # The job's samples, and its models: pretrain from scratch, SFT from pretrain's weights, each lowering the
    # loss on its own data (the same examples scored with the weights it started from and ended with).
    for stage, prompts in (("pretrain", CONTINUATION_PROMPTS), ("sft", CHAT_PROMPTS)):
        samples = json.loads((root / f"{stage}_samples.json").read_text())
        assert [sample["prompt"] for sample in samples] == list(prompts)
        assert all(sample["output"] and sample["chat"] == (stage == "sft") for sample in samples), samples
    uniform = math.log(6400)
    assert metrics(root / "pretrain")[0]["loss"] == pytest.approx(uniform, abs=0.1)
    assert metrics(root / "sft")[0]["loss"] < uniform - 0.5
    sft_config = build_config(load_yaml(root / "sft" / "config.yaml"))
    before, after = (fixed_examples_loss(root / run, sft_config) for run in ("pretrain", "sft"))
    assert after < before - 0.02, (before, after)

    # The other entry points, as users start them, from the job's models.
    models = {name: (root / name).resolve() for name in ("pretrain", "sft")}
    others = {entry: job(entry, tmp_path / "others", entry, [*other_args(entry, models), *OTHERS_COMMON])
              for entry in OTHER_STAGES}  # fmt: skip

    record_path = root / "experiment.json"
    settings = json.loads(record_path.read_text())["settings"]
    assert "pretrain.overrides.optim.max_steps=24" in settings

    main(["experiments/sample.yaml", "--set", *settings])
    record = json.loads(record_path.read_text())
    again = {name: step["status"] for name, step in record["steps"].items()}
    assert set(again.values()) == {"cached"}, again
    steps = record["steps"]
    assert steps["pretrain"]["summary"]["tokens"] == 24 * 8 * 128  # max_steps x batch x seq_len
    assert steps["pretrain"]["gpu_hours"] == 0.0 and "gpu_hours" not in steps["eval"]  # CPU workers
    assert steps["sft"]["config"]["checkpoint"]["init_from"] == steps["pretrain"]["output"]
    assert steps["eval"]["config"]["checkpoint"] == steps["sft"]["output"]
    assert 1 < steps["eval"]["summary"]["val_perplexity"] < 6400
    assert (root / "sft").resolve() == Path(steps["sft"]["output"])
    exported = load_model(root / "sft").state_dict()
    assert all((import_hf(root / "export").state_dict()[k] == v).all() for k, v in exported.items())
    page = (root / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 1 and all(f"<td>{name}</td>" in page for name in steps)
    assert "Evaluation: eval" in page and "val_perplexity" in page

    # An SFT override would run SFT and what follows it again (the dry-run test above checks why).
    changed = subprocess.run([sys.executable, "ray_jobs/experiment.py", "experiments/sample.yaml", "--dry-run",
                              "--set", *settings, "sft.overrides.optim.lr=2.0e-3"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120).stdout  # fmt: skip
    would_run = {line.split()[0] for line in changed.splitlines() if line.startswith("  ") and "would run" in line}
    assert would_run == {"sft", "eval", "export"}, changed

    for entry, process in others.items():
        finish(process)
        assert resolve_checkpoint(tmp_path / "others" / entry).name == f"step_{OTHERS_STEPS:08d}", entry
    check_other_stages(tmp_path / "others", models, uniform)


# ray_jobs/{lora,dpo,reasoning,distill}.py, each from its 26M recipe shrunk to the tiny preset, on the
# sample's files for that stage: the fine-tunes start from the sample job's SFT model; distillation teaches
# its pretrained model to imitate the SFT model.
OTHER_STAGES = {
    "lora": ["--init-from", "sft", "--optim.lr", "1e-2"],
    "dpo": ["--init-from", "sft", "--optim.lr", "1e-3"],
    "reasoning": ["--init-from", "sft", "--optim.lr", "1e-3"],
    "distill": ["--init-from", "pretrain", "--optim.lr", "3e-3"],
}
OTHERS_STEPS = 8
OTHERS_COMMON = [
    "--model.preset", "tiny", "--data.seq_len", "128", "--optim.batch_size", "8", "--optim.warmup_steps", "0",
    f"--optim.max_steps={OTHERS_STEPS}", "--optim.epochs", "20", "--logging.every_steps", "1",
    "--checkpoint.every_steps", str(OTHERS_STEPS),
]  # fmt: skip


def other_args(entry, models: dict) -> list[str]:
    """``models``: the job's pretrain and sft model directories."""
    flags = [str(models[value]) if flag == "--init-from" else value
             for flag, value in zip(OTHER_STAGES[entry][::2], OTHER_STAGES[entry][1::2])]  # fmt: skip
    args = [part for pair in zip(OTHER_STAGES[entry][::2], flags) for part in pair]
    teacher = ["--objective.teacher", str(models["sft"])] if entry == "distill" else []
    return ["--config", f"recipes/minimind-26m/{entry}.yaml", *args, *teacher]


def check_other_stages(storage, models, uniform):
    from safetensors.torch import load_file

    from minimind.model.checkpoint import ADAPTER_FILE, WEIGHTS_FILE
    from minimind.train.launch import config_from_args

    def config(entry):
        return config_from_args(entry, [*other_args(entry, models), *OTHERS_COMMON, "--storage-path", str(storage),
                                        "--name", entry])  # fmt: skip

    # LoRA: only trained adapters are saved (the base is the SFT model's file), and the adapted model learned the
    # identity conversations (below).
    lora_checkpoint = resolve_checkpoint(storage / "lora")
    assert not (lora_checkpoint / WEIGHTS_FILE).exists()
    adapter = load_file(lora_checkpoint / ADAPTER_FILE)
    assert adapter and all("lora_" in name for name in adapter)
    assert any(name.endswith("lora_B") and tensor.abs().max() > 0 for name, tensor in adapter.items())  # B starts at 0
    base = load_model(models["sft"]).state_dict()
    # DPO: at its first step the policy is its reference, so every margin is 0 and the loss -log sigmoid(0).
    assert metrics(storage / "dpo")[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert max_diff(load_model(storage / "dpo").state_dict(), base) > 0
    for entry in ("lora", "reasoning"):
        # Started from the SFT model, not from scratch, and lowered the loss on its own data.
        assert metrics(storage / entry)[0]["loss"] < uniform - 0.5, entry
        start, end = (fixed_examples_loss(run, config(entry)) for run in (models["sft"], storage / entry))
        assert end < start - 0.02, (entry, start, end)
    # Distillation: the student's KL to its teacher (by torch's kl_div, at temperature 1) went down.
    start, end = (teacher_student_kl(models["sft"], run, config("distill"))
                  for run in (models["pretrain"], storage / "distill"))  # fmt: skip
    assert end < start * 0.9, (start, end)


def fixed_examples(config, count=32):
    """The first ``count`` (at most) training examples of ``config``, in batches of 8."""
    from minimind.data.dataset import build_training_data, collate
    from minimind.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    examples = build_training_data(config, tokenizer).examples
    count = min(count, len(examples))
    return [collate([examples[i] for i in range(start, min(start + 8, count))], tokenizer.pad_id)
            for start in range(0, count, 8)]  # fmt: skip


def fixed_examples_loss(run_dir, config) -> float:
    """Mean loss of ``run_dir``'s latest weights on the first 32 training examples of ``config``."""
    from minimind.eval.evaluator import token_byte_lengths
    from minimind.eval.metrics import perplexity
    from minimind.tokenizer import load_tokenizer

    return perplexity(load_model(run_dir), fixed_examples(config), token_byte_lengths(load_tokenizer()))["val_loss"]


@torch.no_grad()
def teacher_student_kl(teacher_dir, student_dir, config) -> float:
    """KL(teacher || student) per labelled target token on the first 32 training examples of ``config``."""
    import torch.nn.functional as F

    teacher, student = load_model(teacher_dir).eval(), load_model(student_dir).eval()
    total, targets = 0.0, 0
    for batch in fixed_examples(config):
        mask = batch["labels"][:, 1:] != -100
        teacher_log, student_log = (torch.log_softmax(m(batch["input_ids"])[0][:, :-1][mask].double(), -1)
                                    for m in (teacher, student))  # fmt: skip
        total += F.kl_div(student_log, teacher_log, log_target=True, reduction="sum").item()
        targets += int(mask.sum())
    return total / targets


def test_experiments_compared_mark_the_pareto_front_and_the_config_differences(tmp_path):
    from minimind.experiment.compare import load_entry, pareto_front, write_comparison

    # (model FLOPs, bits per byte): b has more compute and a better score than a; c more compute than b and a
    # worse score, so b dominates it; d as much compute as a and a worse score.
    points = {"a": (1e12, 3.0), "b": (2e12, 2.5), "c": (3e12, 2.8), "d": (1e12, 3.2)}
    assert pareto_front(list(points.values())) == [0, 1]
    assert pareto_front([(1.0, 0.2), (2.0, 0.1), (3.0, 0.3)], higher_is_better=True) == [0, 2]

    roots = []
    for name, (flops, bpb) in points.items():
        root = tmp_path / name
        config = {"optim": {"lr": 1e-3 if name != "c" else 2e-3}, "checkpoint": {"dir": str(root / "sft")},
                  "distributed": {"use_gpu": False}}  # fmt: skip
        steps = {
            "sft": {"kind": "train", "config": config, "summary": {"model_flops": flops}},
            "eval": {"kind": "eval", "config": {}, "summary": {"val_bits_per_byte": bpb}},
        }
        root.mkdir()
        (root / "experiment.json").write_text(json.dumps({"name": name, "steps": steps}))
        roots.append(str(root))
    page = write_comparison([load_entry(root) for root in roots], str(tmp_path / "out"))
    text = (tmp_path / "out" / "compare.md").read_text()
    assert "On the Pareto front (val_bits_per_byte, model FLOPs): a, b." in text
    assert "`sft`, a -> c: `optim.lr: 0.001 -> 0.002`" in text and "`sft`, a -> b: the same config" in text
    assert "data:image/png;base64," in open(page).read()

    # GPU-hours as experiment.json records them: 2 workers x 1 GPU x the 1,800 s its task measured; none on CPU.
    from minimind.experiment.record import gpu_hours

    on_gpus = {"config": {"distributed": {"use_gpu": True, "num_workers": 2}}, "seconds": 0.0,
               "summary": {"seconds": 1800.0}}  # fmt: skip
    assert gpu_hours(on_gpus) == 1.0 and gpu_hours({**on_gpus, "config": {"distributed": {}}}) == 0.0
    # Hardware FLOPs from the logged MFU: 1e18 model FLOPs over 1e9 tokens is 1e9 a token; at 1e5 tokens/s on 2
    # devices an MFU of 0.4 means a peak of 5e4 x 1e9 / 0.4 = 1.25e14 FLOP/s a device, for the 1e9 / 1e5 = 1e4 s.
    from minimind.experiment.page import hardware_flops

    on_gpus["summary"].update(model_flops=1e18, tokens=1e9)
    windows = [{"tokens_per_second": 1e5, "mfu": 0.4}, {"tokens_per_second": 1e5, "mfu": 0.4}, {"val_loss": 2.0}]
    assert hardware_flops(on_gpus, windows) == pytest.approx((1.25e14 * 2 * 1e4, 0.4))
    assert hardware_flops(on_gpus, [{"tokens_per_second": 1e5}]) is None  # no MFU logged: a CPU run
    # An evaluation's multiple-choice subjects, each a row of the page.
    from minimind.experiment.page import _eval_blocks

    history = {"accuracy": 2 / 3, "accuracy_per_byte": 1 / 3, "chance": 0.25, "questions": 3, "contaminated": 1}
    [_, _, subjects] = _eval_blocks({"eval": {"metrics": {"choice_accuracy": 2 / 3, "choice_subjects":
                                                          {"history": history}}}})  # fmt: skip
    assert subjects == ("table", ["subject", "questions", "accuracy", "per byte", "chance", "contaminated"],
                        [["history", "3", "66.7%", "33.3%", "25.0%", "1"]])  # fmt: skip


SWEPT = f"""\
name: swept
storage_path: {{storage}}
steps:
  data:
    prepare: {{{{inputs: [{SAMPLE / "pretrain.jsonl"}], seq_len: 64}}}}
  lr_sweep:
    sweep: {{{{space: {ROOT / "search_spaces/tiny.yaml"}, num_samples: 4, data: data}}}}
  best:
    train: {{{{stage: pretrain, recipe: {{{{best: lr_sweep}}}}, data: data, overrides: {{{{optim.max_steps: 6}}}}}}}}
"""


def test_a_sweep_step_feeds_its_best_configuration_to_a_train_step(tmp_path):
    from minimind.experiment.graph import resolved_config

    def swept(**replace):
        text = SWEPT.format(storage=tmp_path / "runs")
        for old, new in replace.items():
            text = text.replace(old, new)
        return write(tmp_path, text)

    planned = plan(load_experiment(swept()))
    sweep, best = planned["lr_sweep"], planned["best"]
    assert best.step.parent_names == ["lr_sweep", "data"]
    config = resolved_config(planned, "best")
    assert config["recipe_from"] == f"{sweep.output}/best.yaml"  # read when it runs, after the sweep
    assert config["recipe_overrides"]["data.seq_len"] == 64 and config["optim"]["max_steps"] == 6
    assert resolved_config(planned, "lr_sweep")["overrides"]["data.train_files"] == [planned["data"].output]
    # More trials: a new sweep, and a new best run from it.
    more = plan(load_experiment(swept(**{"num_samples: 4": "num_samples: 6"})))
    assert {n for n in planned if more[n].hash != planned[n].hash} == {"lr_sweep", "best"}
    for replace, message in [
        ({"recipe: {best: lr_sweep}": "recipe: {best: data}"}, "steps.best.train.recipe: 'data' is a prepare step"),
        ({"num_samples: 4": "num_samples: 0"}, "steps.lr_sweep.sweep.num_samples: a positive integer"),
        ({"tiny.yaml": "tiny.yml"}, "steps.lr_sweep.sweep.space: "),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_experiment(swept(**replace))

    # A pipeline space (experiments/sample-sweep.yaml): its SFT stage trains on the step named in then_data, and
    # an SFT step's {best: ...} is the sweep's best-sft.yaml.
    pipeline = ROOT / "experiments" / "sample-sweep.yaml"
    planned = plan(load_experiment(pipeline, [f"storage_path={tmp_path / 'runs'}"]))
    overrides = resolved_config(planned, "sweep")["overrides"]
    sft_data = planned["sft_data"].output
    assert overrides["sft/data.train_files"] == overrides["sft/eval.val_files"] == [sft_data]
    assert overrides["sft/data.seq_len"] == 256 and overrides["data.seq_len"] == 128
    assert resolved_config(planned, "pretrain")["recipe_from"] == f"{planned['sweep'].output}/best.yaml"
    sft = resolved_config(planned, "sft")
    assert sft["recipe_from"] == f"{planned['sweep'].output}/best-sft.yaml"
    assert sft["recipe_overrides"]["checkpoint.init_from"] == planned["pretrain"].output
    text = pipeline.read_text().replace("data/sample/", f"{SAMPLE}/")
    text = text.replace("search_spaces/", f"{ROOT}/search_spaces/")
    for old, new, line, message in [
        ("then_data: {sft: sft_data}", "then_data: {dpo: sft_data}", 17, "'dpo' is not a later stage of "),
        ("then_data: {sft: sft_data}", "then_data: {sft: sweep}", 17, "'sweep' is a sweep step; data comes from"),
        ("train: {stage: sft,", "train: {stage: reasoning,", 24, "sweep 'sweep' tunes the stages pretrain, sft; a "
         "reasoning step cannot use its best"),
    ]:  # fmt: skip
        assert old in text
        bad = write(tmp_path, text.replace(old, new), "bad.yaml")
        with pytest.raises(ConfigError, match=rf"bad.yaml:{line}: .*{message}"):
            load_experiment(bad)
