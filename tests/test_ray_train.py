"""Ray Train on a real two-node local cluster: multi-node DDP parity, fault tolerance, resume and chained
stages (``ray job submit``, with a driver killed and the job resubmitted, is in tests/test_cluster_flow.py).
Runs are started the way users start them (the entry points, as subprocess drivers) and judged by what they
wrote to their run directories.
"""

import json
import math
import re
import shutil
import signal
import subprocess

import pytest
import torch
from conftest import ROOT, tiny_config
from ray_runs import (
    final_weights,
    finish,
    job,
    max_diff,
    metrics,
    pretrain,
    tiny_pretrain_args,
    train_workers,
    wait_for_checkpoint,
)

from minimind.model.checkpoint import load_model, resolve_checkpoint
from minimind.train.loop import Trainer

STEPS = 40
# Tiny preset, a report every step (per-step losses), a checkpoint every 10 steps.
COMMON = tiny_pretrain_args(STEPS, lr="1e-2", checkpoint_every=10, placement="SPREAD")
# Dropout makes every rank's random stream part of the state a restart must restore. Log, evaluation
# and checkpoint steps that do not divide each other: at an evaluation-only step only rank 0 has metrics,
# yet every rank must join Ray's report barrier (a run that got this wrong hung at step 7). Log rows go to
# Ray 0.3 s apart by rank 0's clock, at steps the other rank cannot know but must join all the same.
LOG_EVERY, EVAL_EVERY, CHECKPOINT_EVERY = 3, 7, 10
WITH_DROPOUT = [
    *COMMON, "--model.dropout", "0.1", "--max-failures", "1", "--logging.every_steps", str(LOG_EVERY),
    "--logging.ray_report_every_s", "0.3",
    "--eval.every_steps", str(EVAL_EVERY), "--eval.val_fraction", "0.05", "--eval.max_examples", "8",
    "--eval.continuation_docs", "2", "--optim.schedule", "wsd",
]  # fmt: skip
# The reference also branches a cooldown at each stable evaluation (both workers train the branch),
# which must leave the run as it was: the killed run, without them, ends with the same weights.
COOLED = [*WITH_DROPOUT, "--eval.cooldown_fraction", "0.25"]


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, storage):
    """Two workers with dropout, trained straight through: the reference for every restart below."""
    finish(pretrain(storage, "straight", COOLED))
    return storage / "straight"


# Steps of the two-node runs compared with one process. MoE: the workers route different tokens and
# each computes the balance loss of its own half of the batch (weighted by its share of the targets);
# a few steps show that they sum to the one process's.
TWO_NODE_STEPS = {"dense": 20, "moe": 6}
TWO_NODE_LR = 1e-3


@pytest.fixture(scope="module")
def two_node_runs(ray_cluster, storage):
    """The dense and the MoE run, two workers on two nodes, started together so that one's start-up
    overlaps the other's training: ``{model: (run_dir, driver output)}``."""
    args = [*COMMON[:-2], "--distributed.placement_strategy", "STRICT_SPREAD", f"--optim.lr={TWO_NODE_LR}"]
    drivers = {
        model: pretrain(storage, f"two-nodes-{model}", [*args, f"--optim.max_steps={steps}",
                                                        f"--model.moe.enabled={str(model == 'moe').lower()}"])
        for model, steps in TWO_NODE_STEPS.items()
    }  # fmt: skip
    return {model: (storage / f"two-nodes-{model}", finish(process)) for model, process in drivers.items()}


@pytest.mark.parametrize("model", TWO_NODE_STEPS)
def test_two_workers_on_two_nodes_match_one_worker_with_the_same_global_batch(two_node_runs, model):
    run_dir, out = two_node_runs[model]
    steps = TWO_NODE_STEPS[model]
    nodes = set(re.findall(r"\[worker\] rank \d/2 on node \S+ \((\w+)\)", out))
    assert len(nodes) == 2, out[-3000:]  # one worker per node
    ray_rows = metrics(run_dir)
    # The same global batch (2 x 4 = 1 x 8) in one process: batches are cut from the same
    # seeded order, so each step sees exactly the same examples.
    optim = {"batch_size": 8, "max_steps": steps, "lr": TWO_NODE_LR, "warmup_steps": 5}
    local = Trainer(tiny_config(model={"moe": {"enabled": model == "moe"}}, data={"seq_len": 64}, optim=optim))
    local_rows = local.fit().history
    ray_losses, local_losses = [m["loss"] for m in ray_rows], [m["loss"] for m in local_rows]
    assert len(ray_losses) == len(local_losses) == steps
    # Only the order of fp32 sums differs (gradients all-reduced across ranks): ~1e-7 relative at
    # step 1. AdamW's first updates are ~lr * sign(g), so noise in near-zero gradient entries can
    # move a weight by ~lr; at lr 1e-3 over 20 steps that keeps the loss within 1e-4 relative
    # (measured: 1.2e-7), while a wrong normalisation or different data is off by > 1e-2.
    assert ray_losses[0] == pytest.approx(local_losses[0], rel=1e-6)
    for step, (a, b) in enumerate(zip(ray_losses, local_losses), start=1):
        assert a == pytest.approx(b, rel=1e-4), f"step {step}: 2 workers {a}, 1 worker {b}"
    logged = ray_rows[-1]
    assert {"loss", "lr", "grad_norm", "tokens_per_second", "padding_fraction"} <= set(logged)
    if model == "moe":
        for step, (a, b) in enumerate(zip(ray_rows, local_rows), start=1):
            assert a["aux_loss"] == pytest.approx(b["aux_loss"], rel=1e-5), f"step {step} balance loss"
        # The same weights up to that rounding (measured: 1e-6 after 6 steps; the restart test's 1e-5).
        assert max_diff(final_weights(run_dir), local.model.state_dict()) < 1e-5


def test_every_rank_reports_at_log_eval_and_checkpoint_steps_that_do_not_divide_each_other(uninterrupted):
    rows = metrics(uninterrupted)  # the run finished: no rank waited alone at a report
    log_steps = set(range(LOG_EVERY, STEPS + 1, LOG_EVERY)) | {STEPS}
    eval_steps = set(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY)) | {STEPS}
    assert [row["step"] for row in rows] == sorted(log_steps | eval_steps)
    assert {row["step"] for row in rows if "val_loss" in row} == eval_steps
    assert {row["step"] for row in rows if "loss" in row} == log_steps
    assert sorted(p.name for p in uninterrupted.glob("step_*")) == ["step_00000030", "step_00000040"]
    # The last 20% (8 steps) of the 40 decay from step 32: the evaluations before it branch round(0.25 * step).
    branched = {row["step"]: row["cooldown_steps"] for row in rows if "cooldown_steps" in row}
    assert branched == {7: 2, 14: 4, 21: 5, 28: 7}
    assert all(row["val_loss"] != row["val_loss_stable"] for row in rows if "cooldown_steps" in row)


def test_a_killed_worker_is_restarted_from_the_last_checkpoint(ray_cluster, storage, uninterrupted):
    run_dir = storage / "killed-worker"
    process = pretrain(storage, "killed-worker", WITH_DROPOUT)
    wait_for_checkpoint(run_dir, process)
    victims = train_workers(ray_cluster)
    assert victims, "no Ray Train worker process found"
    victims[-1].send_signal(signal.SIGKILL)
    out = finish(process)  # the driver lives on, so the restarted worker's lines reach it
    # The restarted group resumes from the newest checkpoint, which may be the one just written
    # (then no step runs twice), never from scratch.
    resumed = [int(step) for step in re.findall(r"\[checkpoint\] resumed from \S+ at step (\d+)", out)]
    assert resumed and 10 <= resumed[-1] < STEPS, out[-3000:]
    assert metrics(run_dir)[-1]["step"] == STEPS
    assert max_diff(final_weights(run_dir), final_weights(uninterrupted)) < 1e-5


def test_working_dir_upload_stays_far_below_rays_limit():
    from ray._private.runtime_env.packaging import create_package

    target = ROOT / "runs" / "upload-check.zip"
    target.parent.mkdir(exist_ok=True)
    # What the README's examples leave in the working directory: a corpus at the root, prepared shards,
    # an HF export and MiniMind weights.
    probes = [ROOT / "upload-probe.jsonl", ROOT / "data/prepared/probe/x.npy", ROOT / "hf/probe/model.safetensors",
              ROOT / "upload-probe.pth"]  # fmt: skip
    created = [probe for probe in probes if not probe.exists()]
    folders = [folder for folder in (ROOT / "data/prepared", ROOT / "hf") if not folder.exists()]
    try:
        for probe in created:
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_text("x")
        create_package(str(ROOT), target, include_gitignore=True)
        import zipfile

        names = zipfile.ZipFile(target).namelist()
        size = target.stat().st_size
    finally:
        target.unlink(missing_ok=True)
        for probe in created:
            probe.unlink()
        for folder in folders:
            shutil.rmtree(folder)
    assert not [n for n in names if n.startswith((".git/", ".venv/", "runs/", "data/prepared/", "hf/"))]
    assert not [n for n in names if n.endswith((".pth", "upload-probe.jsonl"))]
    assert "ray_jobs/pretrain.py" in names and "data/sample/pretrain.jsonl" in names
    assert size < 25 * 2**20, f"{size / 2**20:.1f} MiB"  # Ray refuses more than 100 MiB


def test_the_sample_job_and_every_stage_after_it_start_from_the_previous_weights(ray_cluster, tmp_path):
    """The README's main job, ``scripts/run_sample.sh --smoke`` (its commands, 24 steps a stage), on the test
    cluster; then each other entry point from its runs."""
    from minimind.eval.samples import CHAT_PROMPTS, CONTINUATION_PROMPTS
    from minimind.train.launch import config_from_args

    out = tmp_path / "sample"
    done = subprocess.run(["bash", "scripts/run_sample.sh", str(out), "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    scores = json.loads((out / "eval" / "eval.json").read_text())
    assert 1 < scores["metrics"]["val_perplexity"] < 6400, scores  # finite, and better than a uniform guess
    for stage, prompts in (("pretrain", CONTINUATION_PROMPTS), ("sft", CHAT_PROMPTS)):
        samples = json.loads((out / f"{stage}_samples.json").read_text())
        assert [sample["prompt"] for sample in samples] == list(prompts)
        assert all(sample["output"] and sample["chat"] == (stage == "sft") for sample in samples), samples

    common = ["--storage-path", str(out), "--optim.max_steps", "24", "--logging.every_steps", "4",
              "--checkpoint.every_steps", "24", "--optim.batch_size", "8"]  # fmt: skip
    sample_runs = {  # what the script ran, for the checks below
        "pretrain": ("pretrain", ["--config", "recipes/tiny/pretrain.yaml", "--data.train_files",
                                  f"[{out / 'data' / 'pretrain'}]", *common]),
        "sft": ("sft", ["--config", "recipes/tiny/sft.yaml", "--init-from", "pretrain", "--data.train_files",
                        f"[{out / 'data' / 'sft'}]", *common]),
    }  # fmt: skip
    # The other entry points, as users start them, from the script's runs.
    others = {entry: job(entry, out, entry, [*other_args(entry, out), *OTHERS_COMMON]) for entry in OTHER_STAGES}

    uniform = math.log(6400)
    for name, previous in (("pretrain", None), ("sft", "pretrain")):
        assert resolve_checkpoint(out / name).name == "step_00000024"
        first_loss = metrics(out / name)[0]["loss"]
        if previous is None:
            assert first_loss == pytest.approx(uniform, abs=0.1)  # from scratch
            continue
        # Started from the previous stage's weights, not from scratch ...
        assert first_loss < uniform - 0.5, (name, first_loss)
        # ... and this stage lowered the loss on its own data: the same examples scored with the
        # weights it started from and the weights it ended with (no batch-to-batch noise).
        entry, args = sample_runs[name]
        config = config_from_args(entry, [*args, "--name", name])
        before, after = (fixed_examples_loss(run, config) for run in (out / previous, out / name))
        assert after < before - 0.02, (name, before, after)
    for entry, process in others.items():
        finish(process)
        assert resolve_checkpoint(out / entry).name == f"step_{OTHERS_STEPS:08d}", entry
    check_other_stages(out, uniform)


# ray_jobs/{lora,dpo,reasoning,distill}.py, each from its 26M recipe shrunk to the tiny preset, on the
# sample's files for that stage: the fine-tunes start from the sample job's SFT run; distillation teaches
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


def other_args(entry, storage) -> list[str]:
    teacher = ["--objective.teacher", str(storage / "sft")] if entry == "distill" else []
    return ["--config", f"recipes/minimind-26m/{entry}.yaml", *OTHER_STAGES[entry], *teacher]


def check_other_stages(storage, uniform):
    from safetensors.torch import load_file

    from minimind.model.checkpoint import ADAPTER_FILE, WEIGHTS_FILE
    from minimind.train.launch import config_from_args

    def config(entry):
        return config_from_args(entry, [*other_args(entry, storage), *OTHERS_COMMON, "--storage-path", str(storage),
                                        "--name", entry])  # fmt: skip

    # LoRA: only trained adapters are saved (the base is the SFT run's file), and the adapted model learned the
    # identity conversations (below).
    lora_checkpoint = resolve_checkpoint(storage / "lora")
    assert not (lora_checkpoint / WEIGHTS_FILE).exists()
    adapter = load_file(lora_checkpoint / ADAPTER_FILE)
    assert adapter and all("lora_" in name for name in adapter)
    assert any(name.endswith("lora_B") and tensor.abs().max() > 0 for name, tensor in adapter.items())  # B starts at 0
    base = load_model(storage / "sft").state_dict()
    # DPO: at its first step the policy is its reference, so every margin is 0 and the loss -log sigmoid(0).
    assert metrics(storage / "dpo")[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert max_diff(load_model(storage / "dpo").state_dict(), base) > 0
    for entry, before in (("lora", "sft"), ("reasoning", "sft")):
        assert metrics(storage / entry)[0]["loss"] < uniform - 0.5, (
            entry
        )  # started from the SFT model, not from scratch
        start, end = (fixed_examples_loss(storage / run, config(entry)) for run in (before, entry))
        assert end < start - 0.02, (entry, start, end)
    # Distillation: the student's KL to its teacher (by torch's kl_div, at temperature 1) went down.
    start, end = (
        teacher_student_kl(storage / "sft", storage / run, config("distill")) for run in ("pretrain", "distill")
    )
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


def test_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    from minimind.train.loop import NonFiniteLoss

    config = tiny_config(tmp_path, optim={"lr": 1e30, "warmup_steps": 0, "max_steps": 20, "max_grad_norm": 0},
                         checkpoint={"every_steps": 1}, logging={"every_steps": 5})  # fmt: skip
    with pytest.raises(NonFiniteLoss, match=r"NaN/inf at step (\d+)") as caught:
        Trainer(config).fit()
    bad_step = int(caught.value.args[0].split("at step ")[1].split(";")[0])
    last = resolve_checkpoint(tmp_path)
    saved_step = int(last.name.split("_")[1])
    assert saved_step < bad_step
    model = load_model(tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_with_another_global_batch_is_refused(tmp_path):
    Trainer(tiny_config(tmp_path, optim={"max_steps": 2, "batch_size": 8})).fit()
    with pytest.raises(ValueError, match=r"1 worker\(s\) x batch 8 x accumulation 1.*1 x 4 x 1"):
        Trainer(tiny_config(tmp_path, optim={"max_steps": 4, "batch_size": 4})).fit()


def test_step_statistics_stay_on_the_device_between_log_steps():
    trainer = Trainer(tiny_config(optim={"max_steps": 1}))
    stats = trainer.train_step(0)
    # Tensors, not Python numbers: turning them into numbers would wait for the device every step.
    assert all(isinstance(stats[k], torch.Tensor) for k in ("loss_sum", "targets", "aux_loss", "grad_norm"))


def test_entry_point_flags_are_shorthands_for_config_fields(tmp_path):
    from minimind.config import ConfigError
    from minimind.train.launch import config_from_args

    recipe = ["--config", "recipes/tiny/sft.yaml"]
    config = config_from_args("lora", [*recipe, "--num-workers", "2", "--cpus-per-worker", "0.5", "--max-failures=3",
                                       "--wandb", "--storage-path", str(tmp_path), "--optim.lr", "1e-4"])  # fmt: skip
    assert (config.stage, config.lora.enabled, config.optim.lr) == ("sft", True, 1e-4)
    assert (config.distributed.num_workers, config.distributed.cpus_per_worker) == (2, 0.5)
    assert (config.distributed.max_failures, config.logging.wandb) == (3, True)
    assert config.checkpoint.dir == f"{tmp_path}/tiny-lora"  # default name: PRESET-ENTRY
    Trainer(tiny_config(tmp_path / "earlier", optim={"max_steps": 1})).fit()
    chained = config_from_args("sft", [*recipe, "--storage-path", str(tmp_path), "--init-from", "earlier"])
    assert chained.checkpoint.init_from == f"{tmp_path}/earlier"
    with pytest.raises(ConfigError, match="neither a directory nor a run"):
        config_from_args("sft", [*recipe, "--storage-path", str(tmp_path), "--init-from", "missing"])
    with pytest.raises(ConfigError, match="runs 'pretrain' but recipes/tiny/sft.yaml says 'sft'"):
        config_from_args("pretrain", recipe)
