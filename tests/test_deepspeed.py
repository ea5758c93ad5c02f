"""DeepSpeed ZeRO 1/2/3 as a strategy of the same Ray Train jobs, on the two-node local cluster:
per-step parity with DDP, cooldown evaluations that branch each rank's partition and leave the run
bit for bit as it was, sharded checkpoints merged by Ray, exact resume, consolidation into the
project's normal checkpoint, gathered weights for eval under ZeRO-3, and bad configurations
refused before any worker starts."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import deepspeed  # noqa: F401  (part of the test extra: missing, the module fails rather than skips)
import pytest
import torch
from conftest import ROOT
from ray_runs import (
    final_weights,
    finish,
    max_diff,
    metrics,
    pretrain,
    resumed_at,
    tiny_pretrain_args,
    train_workers,
    wait_for_checkpoint,
)

from minimind.config import ConfigError, build_config, load_yaml
from minimind.model.checkpoint import WEIGHTS_FILE, load_model, resolve_checkpoint
from minimind.train.checkpointing import checkpoint_step

STEPS = 12
# Tiny preset, one worker per node, a report every step (per-step losses), a checkpoint every 5 steps.
# Under μP at twice its base width: the hidden matrices' param groups train at half the lr, which the
# ZeRO optimizers must keep from the client optimizer's groups (a lost lr scale doubles their lr).
MUP = ["--model.parametrization", "mup", "--model.mup_base_width", "32"]
STANDARD = tiny_pretrain_args(STEPS, lr="1e-3", checkpoint_every=5, placement="STRICT_SPREAD")
# Warmup-stable-decay, evaluated every 3 steps: a 2-step warmup and the decay the last round(0.2 x 12) = 2 steps,
# so the evaluations at 3, 6 and 9 are stable-phase ones, where runs with cooldown evaluations branch.
EVALUATED = ["--optim.schedule", "wsd", "--optim.warmup_steps", "2", "--eval.every_steps", "3",
             "--eval.val_fraction", "0.05", "--eval.max_examples", "8", "--eval.continuation_docs", "0"]  # fmt: skip
COMMON = [*STANDARD, *MUP, *EVALUATED]
COOLED = ["--eval.cooldown_fraction", "0.25"]


def zero_args(stage: int, *extra: str, base: list[str] = COMMON) -> list[str]:
    return [*base, "--strategy", "deepspeed", "--zero-stage", str(stage), *extra]


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("zero-runs")


# Three runs, two at a time on the test cluster (one worker on each node). ZeRO-2's partitioned gradients
# run in the offload run (stage 2 with the optimizer state in host memory). The same run as zero1-cooled
# without branches is the one whose driver is killed (test_sharded_checkpoints_...).
RUNS = {
    "zero1-cooled": zero_args(1, *COOLED),
    # With cooldown evaluations: ZeRO-3's branches restore partitioned parameters, offload's the host
    # gradient buffers kept from step to step; their losses must still be the reference's step by step.
    "zero3-cooled": zero_args(3, *COOLED),
    "zero2-offload": zero_args(2, "--offload-optimizer", *COOLED),
}


@pytest.fixture(scope="module")
def runs(ray_cluster, storage):
    """Every run of ``RUNS``, trained once: ``{name: (run_dir, driver output)}``.

    They are submitted together and Ray runs as many at a time as the cluster's CPUs allow, so one
    run's start-up overlaps another's training.
    """
    drivers = {name: pretrain(storage, name, args) for name, args in RUNS.items()}
    reference = reference_run(storage)
    finished = {name: (storage / name, finish(process, timeout=600)) for name, process in drivers.items()}
    return {"ddp": (reference, ""), **finished}


def reference_run(storage):
    """The runs' reference, in this process while Ray trains them: the same run with cooldown evaluations on one
    worker with the global batch (2 x 4 = 1 x 8: the same examples each step, tests/test_ray_train.py). Its losses
    are those of the run without branches (tests/test_train.py checks that bit for bit, and that its branches
    score the shorter runs), and its branches are the reference for ZeRO's."""
    from minimind.train.launch import config_from_args
    from minimind.train.loop import Trainer

    config = config_from_args("pretrain", [*COMMON, *COOLED, "--storage-path", str(storage), "--name", "ddp"])
    config.distributed.num_workers, config.optim.batch_size = 1, 2 * config.optim.batch_size
    Trainer(config).fit()
    return storage / "ddp"


def nodes_of(out: str) -> set[str]:
    return set(re.findall(r"\[worker\] rank \d/2 on node \S+ \((\w+)\)", out))


@pytest.mark.parametrize("name", ["zero1-cooled", "zero3-cooled", "zero2-offload"])
def test_zero_stages_give_one_workers_losses_step_by_step_on_two_nodes(runs, name):
    ddp_dir, _ = runs["ddp"]  # the run on one worker: see reference_run
    zero_dir, out = runs[name]
    assert len(nodes_of(out)) == 2, out[-3000:]  # multi-node: one worker on each node
    ddp, zero = [m["loss"] for m in metrics(ddp_dir)], [m["loss"] for m in metrics(zero_dir)]
    assert len(zero) == len(ddp) == STEPS
    # Same data, lr schedule and AdamW update: only the order of fp32 sums differs (each rank's half of
    # the batch reduce-scattered into flat partitions vs one process's sum), ~1e-7 relative per step.
    # At lr 1e-3 AdamW turns that into weight changes of at most ~lr per step in near-zero gradient
    # entries, which keeps the loss within 1e-4 relative over 12 steps; a wrong loss scale (the
    # engine dividing by accumulation or world size again) or a lost lr schedule is off by > 1e-2.
    assert zero[0] == pytest.approx(ddp[0], rel=1e-6)
    for step, (a, b) in enumerate(zip(zero, ddp), start=1):
        assert a == pytest.approx(b, rel=1e-4), f"step {step}: {name} {a}, ddp {b}"
    grad_norms = [m["grad_norm"] for m in metrics(zero_dir)]
    assert all(math.isfinite(g) and g > 0 for g in grad_norms)
    assert max_diff(final_weights(zero_dir), final_weights(ddp_dir)) < 1e-3


def test_zero_branches_score_what_the_references_branches_score(runs):
    def branches(name):
        return {row["step"]: row for row in metrics(runs[name][0]) if "cooldown_steps" in row}

    ddp = branches("ddp")
    assert sorted(ddp) == [3, 6, 9]
    for name in ("zero1-cooled", "zero3-cooled", "zero2-offload"):
        zero = branches(name)
        assert sorted(zero) == sorted(ddp), name
        for step, row in zero.items():
            # The same batches, lrs (μP's group scales included) and AdamW updates as DDP's branch: only the
            # order of fp32 sums differs, so the tolerance of the ZeRO-vs-DDP losses above.
            assert (row["cooldown_steps"], row["duration_tokens"]) == (
                ddp[step]["cooldown_steps"],
                ddp[step]["duration_tokens"],
            ), name
            assert row["val_loss"] == pytest.approx(ddp[step]["val_loss"], rel=1e-4), (name, step)
            assert row["val_loss"] != row["val_loss_stable"], (name, step)  # the branch trained


def test_a_killed_zero_run_resumes_from_its_sharded_checkpoint_and_branches_left_it_bit_for_bit_as_it_was(
    ray_cluster, storage, runs
):
    """zero1-cooled without its branches, its driver killed after the step-5 checkpoint and the job started
    again. Until the kill it must be zero1-cooled bit for bit (the branch at step 3 and the steps after it);
    resumed, it must end with zero1-cooled's weights, as an uninterrupted run does."""
    # Every rank's random state is saved and restored by the same code as under DDP, where
    # tests/test_ray_train.py checks it with dropout; the DeepSpeed engine itself draws no numbers.
    cooled_dir, _ = runs["zero1-cooled"]
    run_dir = storage / "zero1-killed"
    # A slow controller poll leaves the step-5 checkpoint persisted and named by `latest` but not yet
    # recorded by Ray when the driver dies: the resume must still start from it.
    slow_poll = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}
    process = pretrain(storage, "zero1-killed", zero_args(1), env=slow_poll)
    wait_for_checkpoint(run_dir, process)
    process.send_signal(signal.SIGKILL)  # the driver owns the run: its workers go with it
    process.communicate(timeout=60)
    deadline = time.time() + 60
    while train_workers(ray_cluster) and time.time() < deadline:
        time.sleep(0.5)
    before_kill = metrics(run_dir)
    interrupted_at = before_kill[-1]["step"]
    assert 5 <= interrupted_at < STEPS

    # Cooldown branches: each stable-phase evaluation branched round(0.25 x step) steps, trained by both ranks.
    # Each rank put its own partition back (fp32 master weights, Adam's moments and steps, the engine's
    # counters) and rewrote the module's weights from it as a step does: the run went on with the same
    # operations on the same values as the plain run, which on the same CPUs give the same bits (with two
    # ranks every reduced sum is a + b, whichever rank adds). Not merely close: equal. (ZeRO-3's and
    # offload's runs with branches are held to the reference's losses step by step above.)
    cooled = metrics(cooled_dir)
    assert {row["step"]: row["cooldown_steps"] for row in cooled if "cooldown_steps" in row} == {3: 1, 6: 2, 9: 2}
    assert [row["loss"] for row in before_kill] == [row["loss"] for row in cooled[:interrupted_at]]
    # The stable model a branch starts from is the plain run's at that step.
    plain_val = {row["step"]: row["val_loss"] for row in before_kill if "val_loss" in row}
    assert plain_val and all(row["val_loss_stable"] == plain_val[row["step"]] for row in cooled
                             if row["step"] in plain_val)  # fmt: skip

    # Ray merged both ranks' shards into one checkpoint folder; only the run's last one has weights.
    first = resolve_checkpoint(run_dir)  # the newest checkpoint before the kill
    assert {p.name for p in (first / "deepspeed").glob("zero_pp_rank_*_optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }
    assert not (first / WEIGHTS_FILE).exists()
    with pytest.raises(FileNotFoundError, match="minimind consolidate"):
        load_model(first)

    finish(pretrain(storage, "zero1-killed", zero_args(1)))
    # A resume exactly at the last logged step shows no step going back; a fresh start goes back to 0.
    # It resumes from the newest checkpoint on disk, even one Ray's controller had not yet recorded.
    [resumed_step] = resumed_at(run_dir) or [interrupted_at]
    assert resumed_step == checkpoint_step(first.name) and 5 <= resumed_step <= interrupted_at
    assert metrics(run_dir)[-1]["step"] == STEPS
    assert (resolve_checkpoint(run_dir) / WEIGHTS_FILE).exists()
    assert max_diff(final_weights(run_dir), final_weights(cooled_dir)) < 1e-5


def test_consolidate_rebuilds_the_runs_weights_from_shards(runs, tmp_path):
    run_dir, _ = runs["zero3-cooled"]
    copy = tmp_path / "zero3"
    shutil.copytree(run_dir, copy)
    (resolve_checkpoint(copy) / WEIGHTS_FILE).unlink()
    out = tmp_path / "consolidated"
    command = [sys.executable, "-m", "minimind.cli", "consolidate", str(copy), "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # ZeRO-3's shards, merged offline, give exactly what the run gathered at its end.
    assert max_diff(final_weights(out), final_weights(run_dir)) == 0.0
    assert "sharded" not in json.loads((out / "model.json").read_text())


def test_consolidated_checkpoint_continues_as_sft_under_zero3_with_gathered_eval(runs, storage):
    source, _ = runs["zero1-cooled"]
    command = [
        sys.executable, "ray_jobs/sft.py", "--config", "recipes/tiny/sft.yaml", "--init-from", str(source),
        "--data.seq_len", "128", "--optim.batch_size", "4", "--optim.lr", "1e-3", "--optim.max_steps", "6",
        "--logging.every_steps", "1", "--checkpoint.every_steps", "6", "--eval.val_fraction", "0.1",
        "--eval.max_examples", "8", "--eval.continuation_docs", "2", "--eval.every_steps", "3",
        "--num-workers", "2", "--strategy", "deepspeed", "--zero-stage", "3",
        "--storage-path", str(storage), "--name", "sft-zero3",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    run_dir = storage / "sft-zero3"
    history = metrics(run_dir)
    # Started from the consolidated weights: the first step scores as it does in one process on the
    # model loaded from that checkpoint (ranks take alternate batches of one order, so 2 workers x
    # batch 4 see the examples of one worker's 2 accumulated batches of 4).
    raw = load_yaml(run_dir / "config.yaml")
    config = build_config(raw)
    raw.update(distributed={}, checkpoint={"init_from": str(source)})
    raw["optim"].update(grad_accum_steps=2, max_steps=1)
    from minimind.eval.evaluator import Evaluator
    from minimind.train.loop import Trainer

    trainer = Trainer(build_config(raw))
    assert history[0]["loss"] == pytest.approx(trainer.fit().history[0]["loss"], rel=1e-5)
    # Eval during the ZeRO-3 run scored the gathered model: its last figures are those of the
    # final consolidated checkpoint scored here.
    evaluated = [m for m in history if "val_loss" in m]
    assert [m["step"] for m in evaluated] == [3, 6]
    evaluator = Evaluator(config.eval, trainer.tokenizer, trainer.data.validation, torch.device("cpu"))
    final = evaluator(load_model(run_dir))
    assert evaluated[-1]["val_loss"] == pytest.approx(final["val_loss"], rel=1e-5)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"distributed": {"strategy": "deepspeed", "zero_stage": 4}}, "distributed.zero_stage"),
        ({"distributed": {"strategy": "deepspeed", "zero_stage": 3}, "lora": {"enabled": True}},
         "distributed.zero_stage"),
        ({"distributed": {"strategy": "deepspeed"}, "runtime": {"dtype": "fp16"}}, "runtime.dtype"),
        ({"distributed": {"strategy": "deepspeed", "zero_stage": 1, "offload_optimizer": True}},
         "distributed.offload_optimizer"),
        ({"distributed": {"offload_optimizer": True}}, "distributed.offload_optimizer"),
        ({"distributed": {"strategy": "deepspeed"}, "runtime": {"compile": True}}, "runtime.compile"),
    ],
)  # fmt: skip
def test_unsupported_deepspeed_combinations_are_refused_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        build_config(overrides)


def test_offload_beyond_the_clusters_memory_fails_before_any_worker_starts(ray_cluster, storage):
    # About 4.4e11 parameters: 7 TB of offloaded optimizer state, more than any node here.
    huge = ["--model.preset", "custom", "--model.hidden_size", "16384", "--model.num_layers", "128",
            "--model.num_heads", "128", "--model.num_kv_heads", "8", "--model.vocab_size", "6400"]  # fmt: skip
    process = pretrain(storage, "too-big", [*zero_args(3, "--offload-optimizer", base=STANDARD), *huge])
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 2, out[-3000:]
    assert re.search(r"config error: distributed\.offload_optimizer: [\d,]+ parameters need [\d.]+ GiB", out), out
    assert "[worker]" not in out


def test_deepspeed_config_is_filled_from_the_run_config():
    from minimind.train.zero import deepspeed_config

    config = build_config(
        {"optim": {"batch_size": 4, "grad_accum_steps": 3, "max_grad_norm": 0.5},
         "distributed": {"strategy": "deepspeed", "zero_stage": 3, "offload_optimizer": True, "num_workers": 2}}
    )  # fmt: skip
    ds = deepspeed_config(config, torch.bfloat16, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["managed_gradient_accumulation"] is False
    assert "auto" not in json.dumps(ds)


# One process (a world of one over gloo), the loop's model and optimizer under each stage's template in
# bf16: each micro-batch's bf16 gradient read alone, and the K micro-batches accumulated by the engine.
ACCUMULATION = """
import os, sys, torch, torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from minimind.config import build_config
from minimind.train.loop import build_model, build_optimizer
from minimind.train.zero import DeepSpeedZero
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo", rank=0, world_size=1)
K, out = 8, {}
for stage in (1, 2, 3):
    config = build_config({"model": {"preset": "tiny"}, "optim": {"batch_size": 2, "grad_accum_steps": K},
                           "distributed": {"strategy": "deepspeed", "zero_stage": stage}})
    torch.manual_seed(0)
    model = build_model(config, torch.device("cpu"))
    strategy = DeepSpeedZero(config, torch.device("cpu"), torch.bfloat16)
    engine, optimizer = strategy.parallelize(model, build_optimizer(model, config, torch.device("cpu")))
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 6400, (2, 33), generator=generator) for _ in range(K)]
    def backward(batch):
        logits = engine(batch[:, :-1])[0].float()
        strategy.backward(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()) / K)
    def grads():
        return {name: safe_get_full_grad(p).double() for name, p in engine.module.named_parameters()}
    alone = {}
    if stage != 2:  # ZeRO-2 clears its fp32 gradient partition only at step()
        for batch in batches:
            backward(batch)
            alone = {name: alone.get(name, 0) + grad for name, grad in grads().items()}
            optimizer.zero_grad()
    for batch in batches:
        backward(batch)
    out[stage] = {"optimizer": type(optimizer).__name__, "weights": str(next(engine.module.parameters()).dtype),
                  "accumulated": grads(), "summed": alone}
torch.save(out, sys.argv[2])
"""


def test_zero_templates_accumulate_bf16_gradients_in_fp32(tmp_path):
    from local_cluster import free_port

    script = tmp_path / "accumulate.py"
    script.write_text(ACCUMULATION)
    command = [sys.executable, str(script), str(free_port()), str(tmp_path / "grads.pt")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    runs = torch.load(tmp_path / "grads.pt", weights_only=True)
    # Stage 1 with fp32 accumulation is DeepSpeed's BF16 optimizer (ZeRO-1 partitioning of fp32 state).
    assert runs[1]["optimizer"] == "BF16_Optimizer" and runs[2]["optimizer"] == "DeepSpeedZeroOptimizer"
    assert all(run["weights"] == "torch.bfloat16" for run in runs.values())
    for stage in (1, 3):
        for name, reference in runs[stage]["summed"].items():
            accumulated = runs[stage]["accumulated"][name]
            # The engine's sum of the 8 bf16 micro-batch gradients is the fp64 sum of them read one at a time to
            # fp32 rounding (8 additions: <= ~8 x 2^-24 relative); accumulated in bf16 (8 significant bits) it
            # is off by ~2^-9 relative per addition (measured: 4e-3 without the templates' data_types).
            error = (accumulated - reference).norm() / reference.norm()
            assert error < 1e-6, (stage, name, float(error))
    # ZeRO-2 sums the same bf16 gradients in fp32 in the same order as stage 1: equal.
    assert all(torch.equal(grad, runs[1]["accumulated"][name]) for name, grad in runs[2]["accumulated"].items())


def test_cpu_adam_builds_with_the_cpu_builder_on_cuda_nodes_too():
    """What docs/cluster.md and the cluster files tell users: the offload optimizer's op needs g++, not a CUDA
    toolkit, because DeepSpeed's CUDA accelerator hands out the CPU accelerator's builder for it."""
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator
    from deepspeed.ops.op_builder.cpu.builder import CPUOpBuilder

    assert issubclass(CUDA_Accelerator().get_op_builder("CPUAdamBuilder"), CPUOpBuilder)
