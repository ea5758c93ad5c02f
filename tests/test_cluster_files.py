"""Every shipped cluster file passes Ray's own autoscaler checks (prepare_config, validate_config) and this
project's, offline; broken variants are refused naming the file, the line and the key."""

import dataclasses
import re
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

from minimind.capacity import check_placeable, choose_concurrency, limits_from_cluster_config
from minimind.cluster import ClusterFileError, check_cluster_file
from minimind.config import ConfigError
from minimind.cuda import PINNED_TORCH, torch_cuda_major
from minimind.eval.distributed import actor_pool_size

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
    pinned_torch = re.search(r"MINIMIND_TORCH:-([\d.]+)", (ROOT / "scripts" / "setup_env.sh").read_text())[1]
    assert pinned_torch == PINNED_TORCH
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
    "rays-default-ami": (  # no ImageId: Ray's 2023 Deep Learning AMI, whose driver cannot run torch 2.13's CUDA 13
        "g6.2xlarge  # 1 x L4 24 GB\n      ImageId: resolve:ssm:",
        "g6.2xlarge  # 1 x L4 24 GB\n      ImageIdUnused: resolve:ssm:",
        "available_node_types.gpu-1.node_config",
        "    node_config:\n      InstanceType: g6",
        "driver older than 580, and torch 2.13.0 (PyPI) is a CUDA 13 build that needs driver >= 580",
    ),
    "p4d-without-efa": (
        "{NetworkCardIndex: 0, DeviceIndex: 0, InterfaceType: efa",
        "{NetworkCardIndex: 0, DeviceIndex: 0, InterfaceType: interface",
        "available_node_types.gpu-8.node_config.NetworkInterfaces.0.InterfaceType",
        "- {NetworkCardIndex: 0",
        "NCCL between them falls back to TCP sockets",
    ),
    "unpinned-torch": (
        'pip install --quiet "torch==2.13.0"',
        "pip install --quiet torch",
        "setup_commands",
        "setup_commands:\n  # torch",  # the top-level list (gpu-8 has worker_setup_commands above it)
        "pin torch",
    ),
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


def test_an_image_whose_driver_is_too_old_for_the_pinned_torch_is_refused(tmp_path):
    """The GCP file as it was (a Deep Learning VM family with driver 570) cannot run torch 2.13's CUDA 13; the same
    image with a torch built for CUDA 12 can. The head is a CPU node: only GPU node types are judged."""
    text = (ROOT / "clusters" / "gcp.yaml").read_text()
    old_family = text.replace("common-cu129-ubuntu-2204-nvidia-580", "common-cu128-ubuntu-2204-nvidia-570")
    path = tmp_path / "gcp.yaml"
    path.write_text(old_family)
    gpu_1_image = [number for number, line in enumerate(old_family.splitlines(), 1) if "sourceImage:" in line][1]
    key = "available_node_types.gpu-1.node_config.disks.0.initializeParams.sourceImage"
    with pytest.raises(ClusterFileError, match="has NVIDIA driver 570, and torch 2.13.0 .* needs driver >= 580"):
        check_cluster_file(path)
    with pytest.raises(ClusterFileError) as error:
        check_cluster_file(path)
    assert str(error.value).startswith(f"{path}:{gpu_1_image}: {key}:"), str(error.value)
    cu128 = '"torch==2.13.0" --index-url https://download.pytorch.org/whl/cu128'
    path.write_text(old_family.replace('"torch==2.13.0"', cu128))
    check_cluster_file(path)
    assert [torch_cuda_major(*pin) for pin in [("2.13.0", None), ("2.13.0", "https://download.pytorch.org/whl/cu128"),
            ("2.13.0+cpu", None)]] == [13, 12, 0]  # fmt: skip


def one_gpu_trials(path):
    return limits_from_cluster_config(yaml.safe_load(path.read_text()), path.name)


def test_a_sweep_on_an_autoscaling_cluster_counts_what_it_can_scale_to():
    """cluster.yaml starts with its CPU head alone; the autoscaler can add 8 one-GPU and 2 eight-GPU nodes."""
    limits = one_gpu_trials(ROOT / "cluster.yaml")
    head_only = [{"CPU": 8.0, "GPU": 0.0}]
    gpu_trial = {"CPU": 1.0, "GPU": 1.0}
    assert limits.autoscaling
    assert choose_concurrency(head_only, limits, gpu_trial, 1)[0] == 8 * 1 + 2 * 8
    assert choose_concurrency(head_only, limits, {"CPU": 1.0, "GPU": 0.25}, 1)[0] == 4 * 24  # four per GPU
    assert choose_concurrency(head_only, limits, {"CPU": 4.0, "GPU": 1.0}, 8)[0] == 2 + 1  # whole gpu-8s, gpu-1s
    # The global max_workers bounds the nodes of all types together; the best-filled types come first.
    assert choose_concurrency(head_only, dataclasses.replace(limits, max_workers=3), gpu_trial, 1)[0] == 8 + 8 + 1
    # Without readable limits: what the nodes up now fit, except on KubeRay, where the flag is required.
    assert choose_concurrency([{"CPU": 2.0}, {"CPU": 2.0}], None, {"CPU": 1.0}, 1)[0] == 4
    with pytest.raises(ConfigError, match="--max-concurrent: this is a KubeRay cluster"):
        choose_concurrency(head_only, None, gpu_trial, 1, kuberay=True)
    unbounded = dataclasses.replace(limits, max_workers=None)
    unbounded.groups[1].max_count = None
    with pytest.raises(ConfigError, match="--max-concurrent: cluster.yaml lets the cluster scale without a limit"):
        choose_concurrency(head_only, unbounded, gpu_trial, 1)
    unstated = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    del unstated["available_node_types"]["gpu-1"]["resources"]  # Ray would detect them when a node starts
    with pytest.raises(ConfigError, match="or add nodes whose resources it does not state"):
        choose_concurrency(head_only, limits_from_cluster_config(unstated, "cluster.yaml"), gpu_trial, 1)


def test_workers_no_node_can_hold_are_refused_and_what_an_autoscaler_can_add_is_not():
    """Ray would wait for them for ever (Ray Train retries their start each minute): counted by hand."""
    two_nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    with pytest.raises(ConfigError, match=r"its nodes hold 0 such worker\(s\) now, and it does not autoscale"):
        check_placeable(two_nodes, None, {"CPU": 1.0, "GPU": 1.0}, 1)
    with pytest.raises(ConfigError, match=r"^distributed.num_workers: 5 worker\(s\) of 1 CPU each \(PACK\).* hold 4"):
        check_placeable(two_nodes, None, {"CPU": 1.0}, 5)
    check_placeable(two_nodes, None, {"CPU": 1.0}, 4)
    check_placeable(two_nodes, None, {"CPU": 2.0}, 2, "STRICT_SPREAD")
    for placement, workers in [("STRICT_PACK", 2), ("STRICT_SPREAD", 3)]:  # one node holds one; two nodes
        with pytest.raises(ConfigError, match=rf"\({placement}\) do not fit"):
            check_placeable(two_nodes, None, {"CPU": 2.0 if placement == "STRICT_PACK" else 1.0}, workers, placement)
    limits = one_gpu_trials(ROOT / "cluster.yaml")  # GPU nodes the autoscaler adds when asked
    check_placeable([{"CPU": 8.0}], limits, {"CPU": 1.0, "GPU": 1.0}, 16)
    with pytest.raises(ConfigError, match=r"now, and 0 at its largest \(cluster.yaml\)"):
        check_placeable([{"CPU": 8.0}], dataclasses.replace(limits, groups=limits.groups[:1]), {"GPU": 1.0}, 1)
    check_placeable(two_nodes, None, {"CPU": 1.0, "GPU": 1.0}, 1, kuberay=True)  # its limits cannot be read
    with pytest.raises(ConfigError, match="^a sweep trial's workers: 1 worker"):  # a sweep of such trials
        choose_concurrency(two_nodes, None, {"CPU": 1.0, "GPU": 1.0}, 1)


def test_eval_on_gpus_is_refused_where_there_is_none_and_sized_by_what_can_scale():
    cpu_nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    assert actor_pool_size(8, cpu_nodes) == 3  # CPU actors leave a CPU for the read tasks
    with pytest.raises(ConfigError, match="--use-gpu: no node of this Ray cluster has 1 GPU"):
        actor_pool_size(4, cpu_nodes, None, gpus_per_actor=1.0)
    limits = one_gpu_trials(ROOT / "cluster.yaml")
    assert actor_pool_size(4, [{"CPU": 8.0, "GPU": 0.0}], limits, gpus_per_actor=1.0) == 4
    no_gpus = dataclasses.replace(limits, groups=limits.groups[:1])
    with pytest.raises(ConfigError, match="nor can its autoscaler add one"):
        actor_pool_size(4, [{"CPU": 8.0, "GPU": 0.0}], no_gpus, gpus_per_actor=1.0)
