"""Every shipped cluster file passes Ray's own autoscaler checks (prepare_config, validate_config) and this
project's, offline; broken variants are refused naming the file, the line and the key."""

import re
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

from minimind.cluster import ClusterFileError, check_cluster_file

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    import tomli as tomllib

RAY_UP_FILES = [ROOT / "cluster.yaml", ROOT / "clusters" / "gcp.yaml", ROOT / "clusters" / "onprem.yaml"]
RAYJOB = ROOT / "clusters" / "kuberay-rayjob.yaml"


@pytest.mark.parametrize("path", RAY_UP_FILES, ids=lambda p: p.name)
def test_shipped_ray_up_files_pass_rays_own_checks(path):
    prepared = check_cluster_file(path)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    if prepared["provider"]["type"] != "local":
        gpus = {name: t["resources"].get("GPU", 0) for name, t in prepared["available_node_types"].items()}
        assert gpus == {"head": 0, "gpu-1": 1, "gpu-8": 8}
        assert prepared["available_node_types"]["head"]["max_workers"] == 0


def test_the_aws_file_is_what_the_issue_asks_for():
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert raw["docker"]["image"] == "rayproject/ray:2.60.0-gpu"
    assert {name: (t.get("min_workers"), t.get("max_workers")) for name, t in raw["available_node_types"].items()} == {
        "head": (None, None),
        "gpu-1": (0, 8),
        "gpu-8": (0, 2),
    }
    ingress = raw["provider"]["security_group"]["IpPermissions"]
    assert [(rule["FromPort"], rule["ToPort"]) for rule in ingress] == [(22, 22)]  # SSH only; dashboard via tunnel


def test_the_rayjob_has_what_kuberay_needs():
    job = check_cluster_file(RAYJOB)
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert "python ray_jobs/pretrain.py" in job["spec"]["entrypoint"]


def test_nodes_install_what_the_project_pins():
    """The cluster files and the RayJob's runtime environment install the torch that scripts/setup_env.sh
    pins and every dependency pyproject.toml declares (Ray itself comes with Ray's image)."""
    pinned_torch = re.search(r"MINIMIND_CPU_TORCH:-([\d.]+)", (ROOT / "scripts" / "setup_env.sh").read_text())[1]
    for path in RAY_UP_FILES:
        assert f'"torch=={pinned_torch}"' in " ".join(yaml.safe_load(path.read_text())["setup_commands"])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=\[ ]", dep)[0] for dep in project["dependencies"]} - {"torch", "ray"}
    runtime_env = yaml.safe_load(yaml.safe_load(RAYJOB.read_text())["spec"]["runtimeEnvYAML"])
    installed = {re.split(r"[<>=\[ ]", dep)[0] for dep in runtime_env["pip"]}
    assert declared <= installed and f"torch=={pinned_torch}" in runtime_env["pip"]


def broken(tmp_path, source, old, new, anchor):
    """``source`` with ``old`` replaced by ``new``; also the line of ``anchor`` (the key to be named)."""
    text = source.read_text()
    assert old in text and anchor in text, (old, anchor)
    path = tmp_path / source.name
    path.write_text(text.replace(old, new, 1))
    return path, text[: text.index(anchor)].count("\n") + 1


# (replace, with, the key named, the line it is on (first occurrence of this text), words of the message)
RAY_UP_BREAKS = {
    "unknown-key": (
        "max_workers: 10\n",
        "max_workers: 10\nmax_wrokers: 3\n",
        "max_wrokers",
        "upscaling_speed",
        "unexpected",
    ),
    "fractional-gpu": (
        "resources: {CPU: 8, GPU: 1}",
        "resources: {CPU: 8, GPU: 0.5}",
        "available_node_types.gpu-1.resources.GPU",
        "resources: {CPU: 8, GPU: 1}",
        "not of type 'integer'",
    ),
    "head-not-a-type": (
        "head_node_type: head",
        "head_node_type: gpu-16",
        "head_node_type",
        "head_node_type",
        "not one of",
    ),
    "min-above-max": (
        "min_workers: 0\n    max_workers: 2",
        "min_workers: 3\n    max_workers: 2",
        "available_node_types.gpu-8.min_workers",
        "min_workers: 0\n    max_workers: 2",
        "above",
    ),
    "public-dashboard": (
        "--dashboard-host=127.0.0.1",
        "--dashboard-host=0.0.0.0",
        "head_start_ray_commands",
        "head_start_ray_commands:",
        "exposes the dashboard",
    ),
    "no-token-auth": (
        "export RAY_AUTH_MODE=token; ulimit -n 65536; ray start --address",
        "ray start --address",
        "worker_start_ray_commands",
        "worker_start_ray_commands:",
        "RAY_AUTH_MODE=token",
    ),
    "ray-ml-image": (
        "image: rayproject/ray:2.60.0-gpu",
        "image: rayproject/ray-ml:2.49.0-gpu",
        "docker.image",
        "image: rayproject",
        "pinned version",
    ),
    "open-dashboard-port": (
        "FromPort: 22\n        ToPort: 22",
        "FromPort: 22\n        ToPort: 8265",
        "provider.security_group.IpPermissions.0",
        "- FromPort: 22",
        "more than SSH",
    ),
    "token-not-mounted": ("  ~/.ray/auth_token: ~/.ray/auth_token\n", "", "file_mounts", "file_mounts:", "auth token"),
}

RAYJOB_BREAKS = {
    "api-version": ("apiVersion: ray.io/v1", "apiVersion: ray.io/v1alpha1", "apiVersion", "apiVersion", "ray.io/v1"),
    "no-shutdown": (
        "shutdownAfterJobFinishes: true",
        "shutdownAfterJobFinishes: false",
        "spec.shutdownAfterJobFinishes",
        "shutdownAfterJobFinishes",
        "must be true",
    ),
    "load-balancer": (
        "serviceType: ClusterIP",
        "serviceType: LoadBalancer",
        "spec.rayClusterSpec.headGroupSpec.serviceType",
        "serviceType",
        "exposes",
    ),
    "fractional-gpu": (
        "nvidia.com/gpu: 8}\n                  requests",
        "nvidia.com/gpu: 0.5}\n                  requests",
        "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.resources.limits",
        'limits: {cpu: "64"',
        "whole number",
    ),
    "min-above-max": (
        "minReplicas: 1",
        "minReplicas: 3",
        "spec.rayClusterSpec.workerGroupSpecs.0.minReplicas",
        "minReplicas",
        "above maxReplicas",
    ),
    "old-ray": (
        'rayVersion: "2.60.0"',
        'rayVersion: "2.49.0"',
        "spec.rayClusterSpec.rayVersion",
        "rayVersion",
        "pinned Ray version",
    ),
    "no-auth": ("mode: token", "mode: disabled", "spec.rayClusterSpec.authOptions.mode", "mode: token", "token"),
    "no-entrypoint": ("  entrypoint: >-", "  entrypoint_typo: >-", "spec.entrypoint", "spec:", "is required"),
}


@pytest.mark.parametrize("case", RAY_UP_BREAKS)
def test_a_broken_ray_up_file_is_refused_naming_line_and_key(tmp_path, case):
    old, new, key, anchor, message = RAY_UP_BREAKS[case]
    path, line = broken(tmp_path, ROOT / "cluster.yaml", old, new, anchor)
    with pytest.raises(ClusterFileError, match=re.escape(message)) as error:
        check_cluster_file(path)
    assert str(error.value).startswith(f"{path}:{line}: {key}:"), str(error.value)


@pytest.mark.parametrize("case", RAYJOB_BREAKS)
def test_a_broken_rayjob_is_refused_naming_line_and_key(tmp_path, case):
    old, new, key, anchor, message = RAYJOB_BREAKS[case]
    path, line = broken(tmp_path, RAYJOB, old, new, anchor)
    with pytest.raises(ClusterFileError, match=re.escape(message)) as error:
        check_cluster_file(path)
    # A missing key is named at its parent's line.
    assert str(error.value).startswith(f"{path}:{line}: {key}:"), str(error.value)


def test_the_command_checks_files_and_fails_on_a_broken_one(tmp_path):
    path, _ = broken(tmp_path, ROOT / "cluster.yaml", "head_node_type: head", "head_node_type: gpu-16", "head")
    command = [sys.executable, "-m", "minimind.cli", "check-cluster", str(ROOT / "cluster.yaml"), str(path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert "cluster.yaml: ok" in result.stdout and "head_node_type" in result.stderr
