"""Helpers for tests that start Ray Train runs the way users do (the entry points, as subprocess
drivers) and judge them by what they wrote to their run directories."""

import json
import subprocess
import sys
import time

from conftest import ROOT

from minimind import storage
from minimind.model.checkpoint import load_model


def tiny_pretrain_args(steps: int, lr: str, checkpoint_every: int, placement: str) -> list[str]:
    """Flags of a 2-worker tiny-preset pretrain on the sample, reporting every step (per-step losses)."""
    return [
        "--config", "recipes/tiny/pretrain.yaml",
        "--data.seq_len", "64", "--optim.batch_size", "4", "--optim.lr", lr, "--optim.warmup_steps", "5",
        f"--optim.max_steps={steps}", "--logging.every_steps", "1", "--checkpoint.every_steps", str(checkpoint_every),
        "--num-workers", "2", "--distributed.placement_strategy", placement,
    ]  # fmt: skip


def job(entry, storage, name, args, **popen):
    """``python ray_jobs/ENTRY.py ARGS`` started as a user starts it, writing the run STORAGE/NAME."""
    command = [sys.executable, f"ray_jobs/{entry}.py", *args, "--storage-path", str(storage), "--name", name]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def pretrain(storage, name, args, **popen):
    return job("pretrain", storage, name, args, **popen)


def finish(process, timeout=300) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-4000:]
    return out


def metrics(run_dir):
    """The rows of a run's ``metrics.jsonl``; the run local or in object storage."""
    return [json.loads(line) for line in storage.read_text(storage.join(run_dir, "metrics.jsonl")).splitlines()]


def final_weights(run_dir):
    return load_model(run_dir).state_dict()


def max_diff(a, b):
    return max((a[name] - b[name]).abs().max().item() for name in a)


def wait_for_checkpoint(run_dir, process, timeout=180):
    deadline = time.time() + timeout
    while not (run_dir / "latest").exists():
        assert process.poll() is None, process.communicate()[0][-4000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.1)


def processes_running(cluster, text: str):
    """The cluster's live processes whose command line contains ``text`` (ones exiting are left out)."""
    import psutil

    found = []
    for process in cluster.descendants():
        try:
            if text in " ".join(process.cmdline()):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def train_workers(cluster):
    return processes_running(cluster, "RayTrainWorker")


def resumed_at(run_dir) -> list[int]:
    """Steps a run resumed from, read from its metrics (logged every step): where the step goes back.

    Judged from the run directory, not from the driver's output: worker lines printed just before a
    driver exits may never be forwarded to it.
    """
    steps = [m["step"] for m in metrics(run_dir)]
    return [after - 1 for before, after in zip(steps, steps[1:]) if after <= before]


def trial_records(sweep_dir):
    """Each trial's ``trial.json`` (status, params, reason) by trial id; the sweep local or in object storage."""
    from minimind.tune.records import TrialFile, trial_ids

    records = {tid: TrialFile(storage.join(sweep_dir, "trials", tid)).read() for tid in trial_ids(str(sweep_dir))}
    return {tid: record for tid, record in records.items() if record}
