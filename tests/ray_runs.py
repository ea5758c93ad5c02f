"""Helpers for tests that start Ray Train runs the way users do (the entry points, as subprocess
drivers) and judge them by what they wrote to their run directories."""

import json
import subprocess
import sys
import time

from conftest import ROOT

from minimind.model.checkpoint import load_model


def pretrain(storage, name, args, **popen):
    command = [sys.executable, "ray_jobs/pretrain.py", *args, "--storage-path", str(storage), "--name", name]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(process, timeout=300) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-4000:]
    return out


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


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


def train_workers(cluster):
    """The cluster's live Ray Train worker processes (ones exiting while listed are left out)."""
    import psutil

    workers = []
    for process in cluster.descendants():
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                workers.append(process)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return workers
