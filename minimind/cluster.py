"""Offline checks of cluster files before ``ray up`` or ``kubectl apply`` (``minimind check-cluster FILE``).

A ``ray up`` file goes through Ray's own autoscaler code, exactly as ``ray up`` starts: ``prepare_config`` (the
provider's defaults merged in) then ``validate_config`` (Ray's JSON schema: unknown keys, integer resources,
the head type among the node types, worker bounds). On top come what Ray leaves unchecked and this project
relies on:

- each node type's ``min_workers`` at most its ``max_workers``;
- every node runs ``rayproject/ray:<this Ray>-...`` (the client's Ray version; not ``ray-ml``, which ended at
  2.49) and installs ``ray[default,train,tune,data,serve]`` at that version and the project;
- token auth on every node (``RAY_AUTH_MODE=token`` in each start command, the token file mounted);
- the dashboard never reachable from outside: no non-loopback ``--dashboard-host``, and on AWS no inbound
  rule but SSH open to the world;
- torch pinned in ``setup_commands``, and no GPU node type booting an image whose NVIDIA driver is known to be
  older than that torch's CUDA needs (a GCP image family names its driver, ``...-nvidia-570``; an AWS node
  without ``ImageId`` boots Ray's default, an Ubuntu 18.04 Deep Learning AMI). An image whose driver cannot be told
  from its name (an ``ami-...`` id, your own machines) passes: the training processes check the driver at start;
- EFA on the AWS instance types that have it, when a type scales to several nodes (NCCL would use TCP).

A KubeRay ``RayJob`` (``ray.io/v1``) is checked for the fields KubeRay needs and this project relies on: an
entrypoint running a ``ray_jobs/`` script, cluster shutdown after the job, the Ray version and image, token
auth, integer GPU limits, replica bounds, and a head service that stays inside the Kubernetes cluster.

Every problem names the file, the line and the dotted key.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import ray
import yaml

from minimind.cuda import driver_needed, torch_cuda_major

AUTH_TOKEN_PATH = "~/.ray/auth_token"
RAY_LIBRARIES = "ray[default,train,tune,data,serve]"
LOOPBACK = ("127.0.0.1", "localhost")
AWS_DEFAULT_AMI = "Ray's default AMI (AWS Deep Learning AMI Ubuntu 18.04 V71.0)"
AWS_DEFAULT_AMI_DRIVER_BELOW = 580  # that AMI predates NVIDIA's 580 drivers (2025)
AWS_BASE_OSS_DLAMI = re.compile(r"/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-\d+\.\d+/")
AWS_BASE_OSS_DLAMI_DRIVER = 580  # the family's releases since late 2025
GCP_IMAGE_DRIVER = re.compile(r"-nvidia-(\d{3})(?:-|$)")  # Deep Learning VM families name their driver branch
EFA_INSTANCE = re.compile(r"^(p4d|p4de|p5|p5e|p5en|p6-b200)\.")  # GPU types whose NCCL needs EFA between nodes


class ClusterFileError(ValueError):
    """A cluster file that would not start, or would start a cluster this project cannot use safely."""


def check_cluster_file(path: str | Path) -> dict[str, Any]:
    """Check a ``ray up`` file or a KubeRay RayJob; return the config (prepared by Ray for ``ray up`` files)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text))
    except yaml.YAMLError as error:
        raise ClusterFileError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ClusterFileError(f"{path}:1: expected a mapping at the top level")

    def fail(key: str, message: str) -> None:
        raise ClusterFileError(f"{path}:{_line_of(lines, key)}: {key or '(top level)'}: {message}")

    if raw.get("kind") == "RayJob":
        _check_rayjob(raw, fail)
        return raw
    return _check_ray_up(raw, fail)


def _check_ray_up(raw: dict, fail) -> dict:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    node_types = raw.get("available_node_types") or {}
    if node_types and raw.get("head_node_type") not in node_types:
        fail("head_node_type", f"{raw.get('head_node_type')!r} is not one of available_node_types {sorted(node_types)}")
    for name, node_type in node_types.items():
        if isinstance(node_type, dict) and node_type.get("min_workers", 0) > node_type.get("max_workers", 1 << 30):
            fail(f"available_node_types.{name}.min_workers", "is above this type's max_workers")
    try:
        prepared = prepare_config(copy.deepcopy(raw))
        validate_config(prepared)
    except jsonschema.ValidationError as error:
        key = ".".join(str(part) for part in error.absolute_path)
        unexpected = re.search(r"'([^']+)' was unexpected", error.message)  # an unknown key: name it, at its line
        if unexpected:
            key = f"{key}.{unexpected.group(1)}" if key else unexpected.group(1)
        fail(key, f"Ray's cluster schema: {error.message}")
    except (ValueError, RuntimeError, KeyError) as error:
        fail("", f"Ray's cluster checks: {error}")

    version = ray.__version__
    image = (raw.get("docker") or {}).get("image", "")
    if not image.startswith(f"rayproject/ray:{version}"):
        fail("docker.image", f"use Ray's image of the pinned version, rayproject/ray:{version}-gpu (got {image!r})")
    setup = " ".join(raw.get("setup_commands") or [])
    if f'"{RAY_LIBRARIES}=={version}"' not in setup and f"{RAY_LIBRARIES}=={version}" not in setup:
        fail("setup_commands", f"must install {RAY_LIBRARIES}=={version} on every node")
    if "minimind" not in setup:
        fail("setup_commands", "must install the project (pip install -e ~/minimind) on every node")
    mounts = raw.get("file_mounts") or {}
    if AUTH_TOKEN_PATH not in mounts:
        fail("file_mounts", f"mount the cluster's auth token at {AUTH_TOKEN_PATH} so every node has the same one")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = " ".join(raw.get(key) or [])
        if "ray start" not in commands:
            fail(key, "starts no Ray")
        if "RAY_AUTH_MODE=token" not in commands:
            fail(key, "must start Ray with RAY_AUTH_MODE=token (token auth on every node)")
        host = re.search(r"--dashboard-host[= ](\S+)", commands)
        if host and host.group(1) not in LOOPBACK:
            fail(key, f"--dashboard-host {host.group(1)} exposes the dashboard; keep it on 127.0.0.1")
    _check_gpu_stack(raw, fail)
    for index, rule in enumerate((raw.get("provider") or {}).get("security_group", {}).get("IpPermissions", [])):
        world = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])) or any(
            r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges", [])
        )
        if world and (rule.get("FromPort"), rule.get("ToPort")) != (22, 22):
            fail(f"provider.security_group.IpPermissions.{index}", "opens more than SSH to the internet")
    return prepared


def _torch_pin(commands: list) -> tuple[str, str | None] | None:
    """``(version, index_url)`` of the ``torch==`` a list of pip commands installs; None when unpinned."""
    for command in commands:
        pinned = re.search(r"\btorch==([0-9][\w.+]*)", str(command))
        if pinned:
            index = re.search(r"--index-url[= ](\S+)", str(command))
            return pinned.group(1), index.group(1) if index else None
    return None


def _image_driver(provider: str, name: str, node_config: dict) -> tuple[str, str, int | None, int | None] | None:
    """``(key, image, driver, driver_below)`` of a node type's boot image: its known driver branch, or a bound
    the driver is known to be below; None when the image says nothing about its driver."""
    where = f"available_node_types.{name}.node_config"
    if provider == "aws":
        image = node_config.get("ImageId")
        if not image:
            return where, AWS_DEFAULT_AMI, None, AWS_DEFAULT_AMI_DRIVER_BELOW
        if AWS_BASE_OSS_DLAMI.search(str(image)):
            return f"{where}.ImageId", str(image), AWS_BASE_OSS_DLAMI_DRIVER, None
        return None
    if provider == "gcp":
        for index, disk in enumerate(node_config.get("disks") or []):
            image = str(((disk or {}).get("initializeParams") or {}).get("sourceImage", ""))
            found = GCP_IMAGE_DRIVER.search(image.rsplit("/", 1)[-1])
            if found:
                return f"{where}.disks.{index}.initializeParams.sourceImage", image, int(found.group(1)), None
    return None


def _check_gpu_stack(raw: dict, fail) -> None:
    """torch pinned, and no GPU node booting an image whose driver is known to be too old for torch's CUDA;
    EFA on multi-node AWS types that have it."""
    pin = _torch_pin(raw.get("setup_commands") or [])
    if pin is None:
        fail(
            "setup_commands",
            'pin torch (pip install "torch==X"): unpinned, PyPI\'s newest build decides the CUDA, and so the NVIDIA '
            "driver, the nodes need",
        )
    version, index_url = pin
    cuda = torch_cuda_major(version, index_url)
    needed = driver_needed(cuda)
    provider = (raw.get("provider") or {}).get("type", "")
    for name, node_type in (raw.get("available_node_types") or {}).items():
        if not isinstance(node_type, dict) or (node_type.get("resources") or {}).get("GPU", 1) == 0:
            continue  # a CPU node type's driver does not matter
        node_config = node_type.get("node_config") or {}
        image = _image_driver(provider, name, node_config)
        if needed and image:
            key, label, driver, below = image
            if (driver is not None and driver < needed) or (below is not None and below <= needed):
                has = f"NVIDIA driver {driver}" if driver is not None else f"an NVIDIA driver older than {below}"
                fail(
                    key,
                    f"{label} has {has}, and torch {version} ({index_url or 'PyPI'}) is a CUDA {cuda} build that needs "
                    f"driver >= {needed}; boot an image with driver >= {needed} (see the file's GPU stack comment)",
                )
        instance = str(node_config.get("InstanceType", ""))
        if provider == "aws" and EFA_INSTANCE.match(instance) and int(node_type.get("max_workers", 0) or 0) >= 2:
            interfaces = node_config.get("NetworkInterfaces") or []
            plain = [
                i for i, nic in enumerate(interfaces) if (nic or {}).get("InterfaceType") not in ("efa", "efa-only")
            ]
            if not interfaces or plain:
                key = f"available_node_types.{name}.node_config" + (
                    f".NetworkInterfaces.{plain[0]}.InterfaceType" if plain else ""
                )
                fail(
                    key,
                    f"{instance} nodes (up to {node_type['max_workers']}) need EFA network interfaces "
                    "(InterfaceType: efa), or NCCL between them falls back to TCP sockets; see cluster.yaml's gpu-8",
                )


def _check_rayjob(raw: dict, fail) -> None:
    version = ray.__version__

    def need(key: str, kind: type | tuple[type, ...]) -> Any:
        value: Any = raw
        for part in key.split("."):
            if isinstance(value, list):
                value = value[int(part)] if part.isdigit() and int(part) < len(value) else None
            else:
                value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            fail(key, "is required")
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            fail(key, f"expected {' or '.join(k.__name__ for k in _as_tuple(kind))}, got {type(value).__name__}")
        return value

    if raw.get("apiVersion") != "ray.io/v1":
        fail("apiVersion", f"KubeRay's RayJob is ray.io/v1 (got {raw.get('apiVersion')!r})")
    need("metadata.name", str)
    if not re.search(r"python ray_jobs/\w+\.py", need("spec.entrypoint", str)):
        fail("spec.entrypoint", "must run one of this project's ray_jobs/ scripts")
    if need("spec.shutdownAfterJobFinishes", bool) is not True:
        fail("spec.shutdownAfterJobFinishes", "must be true: the cluster goes away when the job ends")
    runtime_env = raw.get("spec", {}).get("runtimeEnvYAML")
    if isinstance(runtime_env, str):
        try:
            packages = (yaml.safe_load(runtime_env) or {}).get("pip") or []
        except yaml.YAMLError as error:
            fail("spec.runtimeEnvYAML", f"not valid YAML: {error}")
        if any(re.match(r"torch\b", str(p)) for p in packages) and _torch_pin(packages) is None:
            fail("spec.runtimeEnvYAML", "pin torch (torch==X): its CUDA decides the NVIDIA driver the nodes need")
    cluster = need("spec.rayClusterSpec", dict)
    if str(need("spec.rayClusterSpec.rayVersion", str)) != version:
        fail("spec.rayClusterSpec.rayVersion", f"must be the pinned Ray version {version}")
    if (cluster.get("authOptions") or {}).get("mode") != "token":
        fail("spec.rayClusterSpec.authOptions.mode", "must be token (KubeRay >= 1.5.1 makes and mounts the token)")
    head = "spec.rayClusterSpec.headGroupSpec"
    if need(head, dict).get("serviceType", "ClusterIP") != "ClusterIP":
        fail(f"{head}.serviceType", "must be ClusterIP: a LoadBalancer or NodePort exposes the dashboard")
    groups = [(head, need(head, dict))] + [
        (f"spec.rayClusterSpec.workerGroupSpecs.{i}", group)
        for i, group in enumerate(need("spec.rayClusterSpec.workerGroupSpecs", list))
    ]
    for where, group in groups:
        containers = need(f"{where}.template.spec.containers", list)
        for index, container in enumerate(containers):
            image = container.get("image", "") if isinstance(container, dict) else ""
            if not image.startswith(f"rayproject/ray:{version}"):
                fail(f"{where}.template.spec.containers.{index}.image", f"use rayproject/ray:{version}-gpu")
            limits = ((container.get("resources") or {}).get("limits") or {}) if isinstance(container, dict) else {}
            gpus = limits.get("nvidia.com/gpu")
            if gpus is not None and not (isinstance(gpus, int) and not isinstance(gpus, bool) and gpus >= 0):
                fail(
                    f"{where}.template.spec.containers.{index}.resources.limits",
                    f"GPUs must be a whole number: {gpus!r}",
                )
        if where != head:
            need(f"{where}.groupName", str)
            bounds = {name: group.get(name) for name in ("minReplicas", "replicas", "maxReplicas")}
            for name, value in bounds.items():
                if value is not None and (not isinstance(value, int) or value < 0):
                    fail(f"{where}.{name}", f"must be a non-negative integer, got {value!r}")
            low, high = bounds["minReplicas"] or 0, bounds["maxReplicas"]
            if high is not None and low > high:
                fail(f"{where}.minReplicas", "is above maxReplicas")


def _as_tuple(kind) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _key_lines(node, prefix: str = "") -> dict[str, int]:
    """Dotted key (list items by index) -> 1-based line, for every key of a composed YAML document."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            lines[key] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, key))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            key = f"{prefix}.{index}" if prefix else str(index)
            lines[key] = item.start_mark.line + 1
            lines.update(_key_lines(item, key))
    return lines


def _line_of(lines: dict[str, int], key: str) -> int:
    """The line of ``key``, else of its nearest ancestor present in the file (a missing key's parent)."""
    while key:
        if key in lines:
            return lines[key]
        key = key.rpartition(".")[0]
    return 1
