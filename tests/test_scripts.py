"""scripts/gpu_check.sh parses, and its dry run (what a machine without a GPU can check) lists every step."""

import os
import subprocess

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ["env", "parse", "a_pretrain", "b_ray_pretrain", "c_ray_zero2", "d_generate", "d_ray_eval", "e_tests"]


def test_gpu_check_parses_and_its_dry_run_writes_the_summary(tmp_path):
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_CHECK_WORK": str(tmp_path / "work")}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    table = (tmp_path / "out" / "summary.txt").read_text().splitlines()[3:]
    rows = {line.split()[0]: line.split()[1] for line in table}
    assert rows == {"env": "PASS", "parse": "PASS", **{step: "SKIP" for step in STEPS[2:]}}, rows
    assert (tmp_path / "out" / "results.jsonl").read_text().count("RESULT ") == 2
