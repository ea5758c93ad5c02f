"""docs/cluster.md's path from a corpus to a tuned model, driven the way users drive a cluster: scripts/cluster_flow.sh
submits each stage with ``ray job submit`` to the session's two-node cluster (a head and a second ``ray start``
node). Everything lives in object storage: an S3-compatible server (moto's server mode, on loopback) stands in
for S3.

Prepare reads jsonl from ``s3://`` and writes its shards there; pretrain trains on them with one worker on each
node and checkpoints there; a 2-trial pipeline sweep in S3 trains on the corpora there, has its driver killed,
and is restored from there when the same job is submitted again; the report, written there, names the best
configs."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml
from conftest import ROOT, SAMPLE
from moto.server import ThreadedMotoServer
from ray_runs import metrics, processes_running, train_workers, trial_records

from minimind import storage

BUCKET = "minimind-test"
STEPS = 8

# search_spaces/tiny_pipeline.yaml (the script's default) at a smaller budget: each trial pretrains 8192 tokens
# (4 steps of 16 x 128 or 8 of 8 x 128), then fine-tunes 4 steps from its weights, and is judged by the SFT model.
SMALL_PIPELINE = (
    (ROOT / "search_spaces" / "tiny_pipeline.yaml")
    .read_text()
    .replace(
        "budget: {max_tokens: 20480, eval_every_tokens: 10240, grace_tokens: 10240",
        "budget: {max_tokens: 8192, eval_every_tokens: 4096, grace_tokens: 4096",
    )
    .replace("optim.batch_size: 8, optim.max_steps: 10", "optim.batch_size: 4, optim.max_steps: 4")
)


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


def flow(cluster, s3, space: Path, *stages: str, wait: bool = True):
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # the `ray` CLI of this environment
        "RAY_ADDRESS": cluster.dashboard_url,
        "STORAGE": f"s3://{BUCKET}/minimind",
        "DATA": f"s3://{BUCKET}/corpora/pretrain.jsonl",
        "SFT_DATA": f"s3://{BUCKET}/corpora/sft.jsonl",
        "SPACE": str(space),
        "PYTHON": sys.executable,
        "RUNTIME_ENV": json.dumps({"env_vars": s3}),
        # One worker per node; a short run checkpointing part-way and at its end.
        "TRAIN_FLAGS": f"--distributed.placement_strategy STRICT_SPREAD --optim.max_steps {STEPS} "
        "--checkpoint.every_steps 4 --logging.every_steps 1",
    }
    command = ["bash", "scripts/cluster_flow.sh", *stages]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return process
    out, _ = process.communicate(timeout=900)
    assert process.returncode == 0, out[-6000:]
    print("\n".join(line for line in out.splitlines() if line.startswith("== ")))
    return out


def remote_yaml(uri: str) -> dict:
    return yaml.safe_load(storage.read_text(uri))


def kill_driver(cluster, entry_point: str, job) -> None:
    """SIGKILL the job's driver, as when its node dies, and wait until its Train workers are gone."""
    drivers = processes_running(cluster, entry_point)
    assert drivers, "the job's driver process was not found"
    for driver in drivers:
        driver.send_signal(signal.SIGKILL)
    job.communicate(timeout=120)
    deadline = time.time() + 60
    while train_workers(cluster) and time.time() < deadline:
        time.sleep(0.5)


def wait_for(condition, job, what: str, timeout: float = 240):
    deadline = time.time() + timeout
    while not (found := condition()):
        assert job.poll() is None, f"the job ended before {what}: " + job.communicate()[0][-4000:]
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return found


def test_from_a_corpus_in_s3_to_a_tuned_model_by_job_submit_on_two_nodes(ray_cluster, s3, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SMALL_PIPELINE)
    assert SMALL_PIPELINE.count("8192") == 1 and "optim.max_steps: 4" in SMALL_PIPELINE
    for corpus in ("pretrain", "sft"):
        storage.upload(SAMPLE / f"{corpus}.jsonl", f"s3://{BUCKET}/corpora/{corpus}.jsonl")
    prepared = f"s3://{BUCKET}/minimind/prepared"

    # Prepare: both corpora, read from S3, as validated shards in S3 with their manifests.
    flow(ray_cluster, s3, space, "prepare")
    for corpus, seq_len in (("pretrain", 128), ("sft", 256)):
        manifest = json.loads(storage.read_text(f"{prepared}/{corpus}/manifest.json"))
        assert manifest["inputs"] == [f"s3://{BUCKET}/corpora/{corpus}.jsonl"] and manifest["seq_len"] == seq_len
        for split in ("train", "val"):
            for shard in manifest["splits"][split]["shards"]:
                assert storage.is_file(f"{prepared}/{corpus}/{shard['path'].removesuffix('.parquet')}.tokens.npy")

    # Pretrain on the corpus in S3, checkpointing to S3, with one worker on each node. (A pretrain job's driver
    # killed and the job submitted again: tests/test_deepspeed.py; an experiment's: tests/test_experiment.py.)
    run = f"s3://{BUCKET}/minimind/runs/pretrain"
    out = flow(ray_cluster, s3, space, "pretrain")
    nodes = set(re.findall(r"\[worker\] rank \d/2 on node \S+ \((\w+)\)", out))
    assert len(nodes) == 2, out[-4000:]
    assert [row["step"] for row in metrics(run)] == list(range(1, STEPS + 1))
    assert storage.read_text(f"{run}/latest").strip() == f"step_{STEPS:08d}"
    assert remote_yaml(f"{run}/config.yaml")["data"]["train_files"] == [f"{prepared}/pretrain"]

    # Pipeline sweep in S3: each of 2 trials pretrains on the corpus in S3, then fine-tunes from its own weights
    # on the SFT corpus in S3, and is judged by the SFT model's validation perplexity. Its driver is killed while
    # a trial runs past its first checkpoint; the same job again restores the sweep from S3.
    sweep = f"s3://{BUCKET}/minimind/sweeps/sweep"

    def checkpointed_running_trial():
        running = [tid for tid, t in trial_records(sweep).items() if t["status"] == "running"]
        return next((tid for tid in running if storage.is_file(f"{sweep}/trials/{tid}/latest")), None)

    first = flow(ray_cluster, s3, space, "sweep", wait=False)
    interrupted = wait_for(checkpointed_running_trial, first, "a trial's checkpoint in S3")
    kill_driver(ray_cluster, "ray_jobs/tune.py", first)
    assert trial_records(sweep)[interrupted]["status"] == "running", "the trial ended before the driver was killed"

    out = flow(ray_cluster, s3, space, "sweep", "report")
    assert f"[sweep] resuming {sweep}" in out and "[sweep] 2/2 trials done" in out, out[-4000:]
    trials = trial_records(sweep)
    assert len(trials) == 2 and all(t["status"] == "finished" for t in trials.values()), trials
    # The interrupted trial continued from its checkpoint in S3, not from scratch: its first logged step ran once.
    steps = [row["step"] for row in metrics(f"{sweep}/trials/{interrupted}")]
    assert steps.count(steps[0]) == 1, steps
    report = storage.read_text(f"{sweep}/report.md")
    for trial_id, trial in trials.items():
        pretrain_dir, sft_dir = f"{sweep}/trials/{trial_id}", f"{sweep}/trials/{trial_id}/sft"
        assert metrics(pretrain_dir)[-1]["tokens"] == 8192
        assert metrics(sft_dir)[-1]["step"] == 4
        pretrain_config, sft_config = remote_yaml(f"{pretrain_dir}/config.yaml"), remote_yaml(f"{sft_dir}/config.yaml")
        assert pretrain_config["data"]["train_files"] == [f"{prepared}/pretrain"]
        assert sft_config["stage"] == "sft" and sft_config["data"]["train_files"] == [f"{prepared}/sft"]
        assert sft_config["checkpoint"]["init_from"] == pretrain_dir
        assert sft_config["optim"]["lr"] == pytest.approx(trial["params"]["sft/optim.lr"])
        judged = metrics(sft_dir)[-1]["val_perplexity"]
        assert f"\n| {trial_id}" in report and f"{judged:.4g}" in report

    # The report's best configs, in S3, run in order: best.yaml (pretrain), then best-sft.yaml from its weights.
    best, best_sft = remote_yaml(f"{sweep}/best.yaml"), remote_yaml(f"{sweep}/best-sft.yaml")
    assert best["data"]["train_files"] == [f"{prepared}/pretrain"]
    assert best_sft["checkpoint"]["init_from"] == best["checkpoint"]["dir"] and "best-sft.yaml" in report
    assert f"--config {sweep}/best.yaml" in report
    assert storage.read_text(f"{sweep}/report.html").count("data:image/png;base64,") >= 2
    assert storage.is_file(f"{sweep}/plots/objective_per_trial.png")
