"""docs/cluster.md's path from a corpus to a tuned model, driven the way users drive a cluster: scripts/cluster_flow.sh
submits each stage with ``ray job submit`` to the session's two-node cluster (a head and a second ``ray start``
node). Prepare, pretrain with one worker on each node, a 2-trial sweep, the report; judged by what they wrote."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from ray_runs import metrics, trial_records

# search_spaces/tiny_pipeline.yaml (the script's default) at a smaller budget: each trial pretrains 8192 tokens,
# (4 steps of 16 x 128 or 8 of 8 x 128), then fine-tunes 6 steps from its weights, and is judged by the SFT model.
SMALL_PIPELINE = (
    (ROOT / "search_spaces" / "tiny_pipeline.yaml")
    .read_text()
    .replace(
        "budget: {max_tokens: 20480, eval_every_tokens: 10240, grace_tokens: 10240",
        "budget: {max_tokens: 8192, eval_every_tokens: 4096, grace_tokens: 4096",
    )
    .replace("optim.max_steps: 10", "optim.max_steps: 6")
)


def run_flow(cluster, storage: Path, space: Path, *stages: str) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # the `ray` CLI of this environment
        "RAY_ADDRESS": cluster.dashboard_url,
        "STORAGE": str(storage),
        "SPACE": str(space),
        "PYTHON": sys.executable,
        # One worker per node, and a short pretrain run.
        "TRAIN_FLAGS": "--distributed.placement_strategy STRICT_SPREAD --optim.max_steps 10",
    }
    done = subprocess.run(
        ["bash", "scripts/cluster_flow.sh", *stages], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    print("\n".join(line for line in done.stdout.splitlines() if line.startswith("== ")))
    return done.stdout


def test_from_a_corpus_to_a_tuned_model_by_job_submit_on_two_nodes(ray_cluster, tmp_path):
    storage = tmp_path / "storage"
    space = tmp_path / "space.yaml"
    space.write_text(SMALL_PIPELINE)
    assert SMALL_PIPELINE.count("8192") == 1 and "optim.max_steps: 6" in SMALL_PIPELINE
    out = run_flow(ray_cluster, storage, space, "prepare", "pretrain", "sweep", "report")
    prepared = storage / "prepared"

    # Prepare: both corpora as validated Parquet shards with a manifest.
    for corpus, seq_len in (("pretrain", 128), ("sft", 256)):
        manifest = json.loads((prepared / corpus / "manifest.json").read_text())
        assert manifest["seq_len"] == seq_len and list((prepared / corpus).rglob("*.parquet"))

    # Pretrain: two workers, one on each node, trained the prepared corpus to the end.
    nodes = set(re.findall(r"\[worker\] rank \d/2 on node \S+ \((\w+)\)", out))
    assert len(nodes) == 2, out[-4000:]
    run = storage / "runs" / "pretrain"
    assert metrics(run)[-1]["step"] == 10
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["train_files"] == [str(prepared / "pretrain")]

    # Pipeline sweep: each of 2 trials pretrains on the prepared pretrain corpus, then fine-tunes from its own
    # weights on the prepared SFT corpus, and is judged by the SFT model's validation perplexity.
    sweep = storage / "sweeps" / "sweep"
    report = (sweep / "report.md").read_text()
    trials = trial_records(sweep)
    assert len(trials) == 2 and all(t["status"] == "finished" for t in trials.values()), trials
    for trial_id, trial in trials.items():
        pretrain_dir, sft_dir = sweep / "trials" / trial_id, sweep / "trials" / trial_id / "sft"
        assert metrics(pretrain_dir)[-1]["tokens"] == 8192 and metrics(sft_dir)[-1]["step"] == 6
        pretrain_config = yaml.safe_load((pretrain_dir / "config.yaml").read_text())
        sft_config = yaml.safe_load((sft_dir / "config.yaml").read_text())
        assert pretrain_config["data"]["train_files"] == [str(prepared / "pretrain")]
        assert sft_config["stage"] == "sft" and sft_config["data"]["train_files"] == [str(prepared / "sft")]
        assert sft_config["checkpoint"]["init_from"] == str(pretrain_dir)
        assert sft_config["optim"]["lr"] == pytest.approx(trial["params"]["sft/optim.lr"])
        judged = metrics(sft_dir)[-1]["val_perplexity"]
        assert f"\n| {trial_id}" in report and f"{judged:.4g}" in report

    # The report's best configs run in order: best.yaml (pretrain), then best-sft.yaml from its weights.
    best = yaml.safe_load((sweep / "best.yaml").read_text())
    best_sft = yaml.safe_load((sweep / "best-sft.yaml").read_text())
    assert best["data"]["train_files"] == [str(prepared / "pretrain")]
    assert best_sft["checkpoint"]["init_from"] == best["checkpoint"]["dir"] and "best-sft.yaml" in report
    assert "Best trial:" in report and (sweep / "report.html").exists()
