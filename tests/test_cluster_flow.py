"""docs/cluster.md's path from a corpus to a tuned model, driven the way users drive a cluster: scripts/cluster_flow.sh
submits experiments/sample-sweep.yaml with ``ray job submit`` to the session's two-node cluster (a head and a
second ``ray start`` node). Everything lives in object storage: an S3-compatible server (moto's server mode, on
loopback) stands in for S3.

Prepare reads jsonl from ``s3://`` and writes its shards there; a 1-trial pipeline sweep trains on them, has the
experiment's driver killed, and is restored from S3 when the same job is submitted again; then the best trial's
pretraining configuration trains with one worker on each node, its SFT configuration from those weights, and
the result is evaluated, each checkpointing to S3."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
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
STORAGE = f"s3://{BUCKET}/minimind"

# search_spaces/tiny_pipeline.yaml (the script's default) at a smaller budget: each trial pretrains 8192 tokens
# (4 steps of 16 x 128 or 8 of 8 x 128), then fine-tunes 4 steps from its weights, and is judged by the SFT model.
# No rung (grace at the budget): one trial has none to be ranked against, and tests/test_tune.py checks rungs.
SMALL_PIPELINE = (
    (ROOT / "search_spaces" / "tiny_pipeline.yaml")
    .read_text()
    .replace(
        "budget: {max_tokens: 20480, eval_every_tokens: 10240, grace_tokens: 10240",
        "budget: {max_tokens: 8192, eval_every_tokens: 4096, grace_tokens: 8192",
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


def flow(cluster, s3, space: Path, wait: bool = True):
    """scripts/cluster_flow.sh (experiments/sample-sweep.yaml) submitted to the cluster, storage and corpora in S3."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # the `ray` CLI of this environment
        "RAY_ADDRESS": cluster.dashboard_url,
        "STORAGE": STORAGE,
        "PYTHON": sys.executable,
        "RUNTIME_ENV": json.dumps({"env_vars": s3}),
    }
    settings = [
        f"pretrain_data.inputs=[s3://{BUCKET}/corpora/pretrain.jsonl]",
        f"sft_data.inputs=[s3://{BUCKET}/corpora/sft.jsonl]",
        f"sweep.space={space}",
        "sweep.num_samples=1",
        # The best configuration on one worker on each node, checkpointing part-way and at its end.
        "pretrain.overrides.distributed.num_workers=2",
        "pretrain.overrides.distributed.placement_strategy=STRICT_SPREAD",
        "pretrain.overrides.checkpoint.every_steps=4",
        "pretrain.overrides.logging.every_steps=1",
        "eval.max_new_tokens=8",
    ]
    command = ["bash", "scripts/cluster_flow.sh", "--set", *settings]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return process
    out, _ = process.communicate(timeout=900)
    assert process.returncode == 0, out[-6000:]
    print("\n".join(line for line in out.splitlines() if line.startswith("[experiment]")))
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
    assert SMALL_PIPELINE.count("8192") == 2 and "optim.max_steps: 4" in SMALL_PIPELINE
    for corpus in ("pretrain", "sft"):
        storage.upload(SAMPLE / f"{corpus}.jsonl", f"s3://{BUCKET}/corpora/{corpus}.jsonl")
    root = f"{STORAGE}/sample-sweep"

    def output(step: str) -> str | None:
        """The step's output directory in S3 (``STEP-<hash>``), once it exists."""
        named = [name for name in storage.list_dir(root) if name.rpartition("-")[0] == step and "." not in name]
        assert len(named) <= 1, named
        return f"{root}/{named[0]}" if named else None

    def checkpointed_running_trial():
        sweep = output("sweep")
        running = [tid for tid, t in trial_records(sweep).items() if t["status"] == "running"] if sweep else []
        checkpointed = [tid for tid in running if storage.is_file(f"{sweep}/trials/{tid}/latest")]
        return (sweep, checkpointed[0]) if checkpointed else None

    # The experiment's driver is killed while a sweep trial runs past its first checkpoint in S3; the same job
    # submitted again keeps the prepared corpora, restores the sweep from S3 and runs the rest.
    shard_folders = set(Path(tempfile.gettempdir()).glob("minimind-shards-*"))  # prepare's local work folders
    first = flow(ray_cluster, s3, space, wait=False)
    sweep, interrupted = wait_for(checkpointed_running_trial, first, "a sweep trial's checkpoint in S3")
    kill_driver(ray_cluster, "ray_jobs/experiment.py", first)
    # Killed with its driver: still `running`, or `failed` where its Train run died a moment before the trial's
    # actor did (a failure other than NaN/inf, which a resumed sweep retries from the checkpoint).
    cut_short = trial_records(sweep)[interrupted]
    assert cut_short["status"] in ("running", "failed") and "NaN" not in (cut_short["reason"] or ""), cut_short
    out = flow(ray_cluster, s3, space)
    record = json.loads(storage.read_text(f"{root}/experiment.json"))
    statuses = {name: step["status"] for name, step in record["steps"].items()}
    assert statuses == {"pretrain_data": "cached", "sft_data": "cached", "sweep": "ran", "pretrain": "ran",
                        "sft": "ran", "eval": "ran"}, statuses  # fmt: skip
    assert storage.is_file(f"{root}/index.html")

    # Prepare: both corpora, read from S3, as validated shards in S3 with their manifests, and nothing left behind
    # in the nodes' temporary folders.
    assert set(Path(tempfile.gettempdir()).glob("minimind-shards-*")) <= shard_folders
    prepared = {corpus: output(f"{corpus}_data") for corpus in ("pretrain", "sft")}
    for corpus, seq_len in (("pretrain", 128), ("sft", 256)):
        manifest = json.loads(storage.read_text(f"{prepared[corpus]}/manifest.json"))
        assert manifest["inputs"] == [f"s3://{BUCKET}/corpora/{corpus}.jsonl"] and manifest["seq_len"] == seq_len
        for split in ("train", "val"):
            for shard in manifest["splits"][split]["shards"]:
                shard_path = shard["path"].removesuffix(".parquet")
                assert storage.is_file(f"{prepared[corpus]}/{shard_path}.tokens.npy")

    # The pipeline sweep: its trial pretrained on the corpus in S3, then fine-tuned from its own weights on the SFT
    # corpus in S3, judged by the SFT model's validation perplexity (tests/test_tune.py ranks several trials). The
    # interrupted trial continued from its checkpoint in S3, not from scratch: its first logged step ran once.
    assert f"[sweep] resuming {sweep}" in out and "[sweep] 1/1 trials done" in out, out[-4000:]
    trials = trial_records(sweep)
    assert len(trials) == 1 and all(t["status"] == "finished" for t in trials.values()), trials
    steps = [row["step"] for row in metrics(f"{sweep}/trials/{interrupted}")]
    assert steps.count(steps[0]) == 1, steps
    report = storage.read_text(f"{sweep}/report.md")
    for trial_id, trial in trials.items():
        pretrain_dir, sft_dir = f"{sweep}/trials/{trial_id}", f"{sweep}/trials/{trial_id}/sft"
        assert metrics(pretrain_dir)[-1]["tokens"] == 8192
        assert metrics(sft_dir)[-1]["step"] == 4
        pretrain_config, sft_config = remote_yaml(f"{pretrain_dir}/config.yaml"), remote_yaml(f"{sft_dir}/config.yaml")
        assert pretrain_config["data"]["train_files"] == [prepared["pretrain"]]
        assert sft_config["stage"] == "sft" and sft_config["data"]["train_files"] == [prepared["sft"]]
        assert sft_config["checkpoint"]["init_from"] == pretrain_dir
        assert sft_config["optim"]["lr"] == pytest.approx(trial["params"]["sft/optim.lr"])
        judged = metrics(sft_dir)[-1]["val_perplexity"]
        assert f"\n| {trial_id}" in report and f"{judged:.4g}" in report
    assert storage.read_text(f"{sweep}/report.html").count("data:image/png;base64,") >= 2

    # The best trial's configurations trained again in turn: best.yaml on one worker on each node, then
    # best-sft.yaml from its weights; the result evaluated.
    best, best_sft = remote_yaml(f"{sweep}/best.yaml"), remote_yaml(f"{sweep}/best-sft.yaml")
    winner = trials[min(trials, key=lambda tid: metrics(f"{sweep}/trials/{tid}/sft")[-1]["val_perplexity"])]
    assert best["optim"]["lr"] == pytest.approx(winner["params"]["optim.lr"])
    assert best_sft["optim"]["lr"] == pytest.approx(winner["params"]["sft/optim.lr"])
    pretrain, sft = output("pretrain"), output("sft")
    nodes = set(re.findall(r"\[worker\] rank \d/2 on node \S+ \((\w+)\)", out))
    assert len(nodes) == 2, out[-4000:]
    last = best["optim"]["max_steps"]
    assert [row["step"] for row in metrics(pretrain)] == list(range(1, last + 1))
    assert storage.read_text(f"{pretrain}/latest").strip() == f"step_{last:08d}"
    pretrain_config, sft_config = remote_yaml(f"{pretrain}/config.yaml"), remote_yaml(f"{sft}/config.yaml")
    for config, tuned in ((pretrain_config, best), (sft_config, best_sft)):
        assert {k: config["optim"][k] for k in tuned["optim"]} == tuned["optim"]
    assert pretrain_config["data"]["train_files"] == [prepared["pretrain"]]
    assert sft_config["checkpoint"]["init_from"] == pretrain
    assert sft_config["data"]["train_files"] == [prepared["sft"]]
    assert metrics(sft)[-1]["step"] == best_sft["optim"]["max_steps"]
    evaluated = json.loads(storage.read_text(f"{output('eval')}/eval.json"))
    assert evaluated["checkpoint"].startswith(sft) and 1 < evaluated["metrics"]["val_perplexity"] < 6400
