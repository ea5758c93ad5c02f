"""Object storage for real: an S3-compatible server (moto's server mode, on loopback) stands in for S3, and the
stages of scripts/cluster_flow.sh run against it by ``ray job submit`` on the session's two-node cluster.
Prepare reads its jsonl from ``s3://`` and writes its shards there; a pretrain run trains on them, checkpoints
there, has its driver killed, and resumes from there when the same job is submitted again."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from conftest import ROOT, SAMPLE
from moto.server import ThreadedMotoServer
from ray_runs import processes_running, train_workers

from minimind import storage
from minimind.train.checkpointing import checkpoint_step

BUCKET = "minimind-test"
STEPS = 20


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free loopback port with one bucket; this process's pyarrow and the jobs (through
    their runtime environment) reach it by ``AWS_ENDPOINT_URL``, with throwaway credentials."""
    import logging
    import socket

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "MINIMIND_CACHE": str(tmp_path_factory.mktemp("cache")),  # where nodes keep their copies of corpora
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        pafs.FileSystem.from_uri(f"s3://{BUCKET}?allow_bucket_creation=true")[0].create_dir(BUCKET)
        yield env
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


def flow(cluster, s3, *stages: str, wait: bool = True):
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "RAY_ADDRESS": cluster.dashboard_url,
        "STORAGE": f"s3://{BUCKET}/minimind",
        "DATA": f"s3://{BUCKET}/corpora/pretrain.jsonl",
        "SFT_DATA": "",
        "SEQ_LEN": "64",
        "PYTHON": sys.executable,
        "RUNTIME_ENV": json.dumps({"env_vars": s3}),
        "TRAIN_FLAGS": f"--optim.max_steps {STEPS} --optim.batch_size 4 --checkpoint.every_steps 5 "
        "--logging.every_steps 1 --data.seq_len 64 --distributed.placement_strategy STRICT_SPREAD",
    }
    command = ["bash", "scripts/cluster_flow.sh", *stages]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return process
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-6000:]
    return out


def remote_rows(uri: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(uri).splitlines()]


def test_prepare_and_a_killed_run_resume_on_s3(ray_cluster, s3):
    storage.upload(SAMPLE / "pretrain.jsonl", f"s3://{BUCKET}/corpora/pretrain.jsonl")
    out = flow(ray_cluster, s3, "prepare")
    prepared = f"s3://{BUCKET}/minimind/prepared/pretrain"
    manifest = json.loads(storage.read_text(f"{prepared}/manifest.json"))
    assert manifest["inputs"] == [f"s3://{BUCKET}/corpora/pretrain.jsonl"] and manifest["seq_len"] == 64
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            assert storage.is_file(f"{prepared}/{shard['path']}")
            assert storage.is_file(f"{prepared}/{shard['path'].removesuffix('.parquet')}.tokens.npy")

    # The pretrain job trains on the corpus in S3 and checkpoints to S3; its driver is killed mid-run.
    run = f"s3://{BUCKET}/minimind/runs/pretrain"
    first = flow(ray_cluster, s3, "pretrain", wait=False)
    deadline = time.time() + 240
    while not storage.is_file(f"{run}/latest"):
        assert first.poll() is None, first.communicate()[0][-4000:]
        assert time.time() < deadline, "no checkpoint appeared in S3"
        time.sleep(0.2)
    drivers = processes_running(ray_cluster, "ray_jobs/pretrain.py")
    assert drivers, "the job's driver process was not found"
    for driver in drivers:
        driver.send_signal(signal.SIGKILL)
    first.communicate(timeout=120)
    deadline = time.time() + 60
    while train_workers(ray_cluster) and time.time() < deadline:
        time.sleep(0.5)
    interrupted_at = remote_rows(f"{run}/metrics.jsonl")[-1]["step"]
    assert interrupted_at < STEPS, "the first job finished before its driver was killed"
    newest = checkpoint_step(storage.read_text(f"{run}/latest").strip())

    # The same job again: it resumes from the newest checkpoint in S3 and trains to the end.
    out = flow(ray_cluster, s3, "pretrain")
    steps = [row["step"] for row in remote_rows(f"{run}/metrics.jsonl")]
    resumed = [after - 1 for before, after in zip(steps, steps[1:]) if after <= before]
    assert resumed == [newest] and 5 <= newest <= interrupted_at, (steps, newest)
    assert steps[-1] == STEPS and storage.read_text(f"{run}/latest").strip() == f"step_{STEPS:08d}"
    assert "[checkpoint] resumed from" in out
