"""How many trials a sweep (or scoring actors an evaluation) runs at once: what the cluster can scale to,
not only what is up when it starts.

A ``ray up`` cluster starts with its head alone (every worker type has ``min_workers: 0``) and adds nodes when
trials ask for them, so counting the nodes present at the start would run a sweep one trial at a time. The
limits come, in this order, from

1. the cluster config the autoscaler reports to Ray's GCS (``ray._private.state.state.get_cluster_config()``,
   what Ray Train and Ray Data read for the same purpose; autoscalers that report it fill it in);
2. the autoscaler's own config file on the head, ``~/ray_bootstrap_config.yaml``, which ``ray up`` writes and the
   head's ``ray start --autoscaling-config`` reads (a ``ray job submit`` driver runs on the head);
3. otherwise the nodes present, unless the cluster may autoscale out of sight (KubeRay, whose autoscaler reads
   the RayCluster resource): then ``--max-concurrent`` is required, since guessing either way is wrong.

The counting is per node: a trial's workers each need ``cpus_per_worker`` CPUs (and ``gpus_per_worker`` GPUs) on
one node, so a node type holds ``min(CPU // cpus, GPU // gpus)`` workers, times the nodes it can scale to, within
the cluster's global ``max_workers``. Everything here but :func:`cluster_limits` is a pure function.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from minimind.config import ConfigError

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
"""Where ``ray up`` puts the autoscaler's config on the head node (inside its container, with docker)."""
KUBERAY_ENV = "RAY_USAGE_STATS_KUBERAY_IN_USE"
"""Set to 1 by KubeRay in every Ray container it starts."""


@dataclass
class NodeGroup:
    """Nodes of one type: the resources of each (None: detected when a node starts), and how many there can be
    (None: no limit)."""

    name: str
    resources: dict[str, float] | None
    max_count: int | None
    min_count: int = 0
    head: bool = False
    """The head node: always there, and not counted in the cluster's ``max_workers``."""


@dataclass
class ClusterLimits:
    """What a cluster can scale to, and where that was read."""

    groups: list[NodeGroup]
    source: str
    max_workers: int | None = None
    """The cluster's bound on worker nodes of all types together (``ray up``'s top-level ``max_workers``)."""
    caps: dict[str, float] = field(default_factory=dict)
    """Bounds on the cluster's total of a resource (the GCS config's ``max_resources``)."""

    @property
    def autoscaling(self) -> bool:
        return any(g.max_count is None or g.max_count > g.min_count for g in self.groups)


def limits_from_cluster_config(config: dict, source: str) -> ClusterLimits | None:
    """The limits of a ``ray up`` config (a cluster file, or the head's bootstrap copy of it).

    The head counts once, outside the global ``max_workers``; every type (the head's too) adds workers up to
    its ``max_workers``. A type without ``resources`` (Ray detects them on the node, as the local provider's)
    has unknown resources: a sweep counts its nodes as they come up, or, if it can scale, cannot count at all.
    """
    node_types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    groups = []
    for name, node_type in node_types.items():
        given = node_type.get("resources")
        resources = {key: float(value) for key, value in given.items()} if given else None
        low = int(node_type.get("min_workers", 0) or 0)
        high = int(node_type.get("max_workers", low) or 0)
        if name == head:
            groups.append(NodeGroup(f"{name} (head)", resources, 1, 1, head=True))
        if high > 0:
            groups.append(NodeGroup(name, resources, high, low))
    if not groups:
        return None
    cap = config.get("max_workers")
    return ClusterLimits(groups, source, max_workers=None if cap is None else int(cap))


def limits_from_gcs(cluster_config, source: str = "the autoscaler's cluster config in the GCS") -> ClusterLimits | None:
    """The limits in Ray's ``autoscaler_pb2.ClusterConfig`` (max_count -1: no limit)."""
    if cluster_config is None or not cluster_config.node_group_configs:
        return None
    groups = [
        NodeGroup(
            group.name,
            {key: float(value) for key, value in group.resources.items()},
            None if group.max_count < 0 else int(group.max_count),
            int(group.min_count),
        )
        for group in cluster_config.node_group_configs
    ]
    caps = {key: float(value) for key, value in cluster_config.max_resources.items()}
    return ClusterLimits(groups, source, caps=caps)


def workers_per_node(resources: dict[str, float] | None, per_worker: dict[str, float]) -> int:
    """Workers needing ``per_worker`` that one node with ``resources`` holds (unknown resources: none)."""
    if resources is None:
        return 0
    fits = [math.floor(resources.get(key, 0.0) / need + 1e-9) for key, need in per_worker.items() if need > 0]
    return max(0, min(fits)) if fits else 0


def max_trials(limits: ClusterLimits, per_worker: dict[str, float], workers_per_trial: int) -> int | None:
    """Trials of ``workers_per_trial`` workers that fit the cluster at its largest; None when that cannot be
    counted (a type with no limit, or one that can scale and whose resources are known only when it starts).

    Worker node types are filled best first (most workers per node) within the cluster's ``max_workers``, so
    the count is the most the autoscaler can reach, then bounded by the cluster-wide resource caps.
    """
    groups = sorted(limits.groups, key=lambda g: (g.head, workers_per_node(g.resources, per_worker)), reverse=True)
    nodes_left = limits.max_workers
    workers = 0
    for group in groups:
        if group.resources is None and (group.max_count is None or group.max_count > group.min_count):
            return None
        per_node = workers_per_node(group.resources, per_worker)
        if per_node == 0:
            continue
        count = group.max_count
        if not group.head and nodes_left is not None:
            count = nodes_left if count is None else min(count, nodes_left)
            nodes_left -= count
        if count is None:
            return None
        workers += per_node * count
    for key, cap in limits.caps.items():
        if per_worker.get(key, 0) > 0:
            workers = min(workers, math.floor(cap / per_worker[key] + 1e-9))
    return workers // workers_per_trial


def present_trials(nodes: list[dict[str, float]], per_worker: dict[str, float], workers_per_trial: int) -> int:
    """Trials that fit the nodes up now (each node's resources)."""
    return sum(workers_per_node(node, per_worker) for node in nodes) // workers_per_trial


def _resources(per_worker: dict[str, float]) -> str:
    """``1 CPU, 1 GPU``: a worker's resources in words."""
    return ", ".join(f"{value:g} {key}" for key, value in per_worker.items())


def check_placeable(
    present: list[dict[str, float]],
    limits: ClusterLimits | None,
    per_worker: dict[str, float],
    workers: int,
    placement: str = "PACK",
    kuberay: bool = False,
    what: str = "distributed.num_workers",
) -> None:
    """Refuse ``workers`` workers needing ``per_worker`` each that neither the nodes up now nor any node the
    autoscaler can add would hold: Ray would wait for them for ever (Ray Train gives up starting them after a
    minute and tries again, without end). Only a sure answer refuses: a KubeRay cluster, or limits that cannot be
    counted, pass; so does an autoscaler that holds the workers in total (``placement``'s strict forms are
    checked on the nodes up now only)."""
    if kuberay:
        return
    holds = [workers_per_node(node, per_worker) for node in present]
    if placement == "STRICT_PACK":
        fit_now = max(holds, default=0) >= workers
    elif placement == "STRICT_SPREAD":
        fit_now = sum(1 for held in holds if held) >= workers
    else:
        fit_now = sum(holds) >= workers
    most = max_trials(limits, per_worker, workers) if limits is not None else 0
    if fit_now or most is None or most > 0:
        return
    if limits is None:
        scale = "and it does not autoscale"
    else:
        scale = f"and {max_trials(limits, per_worker, 1)} at its largest ({limits.source})"
    raise ConfigError(
        f"{what}: {workers} worker(s) of {_resources(per_worker)} each ({placement}) do not fit this Ray cluster: "
        f"its nodes hold {sum(holds)} such worker(s) now, {scale}, so Ray would wait for them for ever; ask for "
        "fewer workers or fewer CPUs/GPUs per worker (or no --use-gpu), or start the nodes first"
    )


def choose_concurrency(
    present: list[dict[str, float]],
    limits: ClusterLimits | None,
    per_worker: dict[str, float],
    workers_per_trial: int,
    kuberay: bool = False,
    placement: str = "PACK",
) -> tuple[int, str]:
    """Trials at once, and a line saying how that was counted. A cluster that may scale beyond what can be
    read (KubeRay, or an autoscaler without a bound) is refused: pass ``--max-concurrent``; so is one where no
    trial fits (:func:`check_placeable`)."""
    check_placeable(present, limits, per_worker, workers_per_trial, placement, kuberay, "a sweep trial's workers")
    now = present_trials(present, per_worker, workers_per_trial)
    need = _resources(per_worker)
    if limits is None:
        if kuberay:
            raise ConfigError(
                "--max-concurrent: this is a KubeRay cluster, whose autoscaler's limits the driver cannot read; "
                f"give the trials to run at once (each trial: {workers_per_trial} worker(s) of {need}; {now} fit "
                "the nodes up now)"
            )
        return max(1, now), f"what the nodes up now fit ({now})"
    most = max_trials(limits, per_worker, workers_per_trial)
    if most is None:
        raise ConfigError(
            f"--max-concurrent: {limits.source} lets the cluster scale without a limit, or add nodes whose resources "
            "it does not state, so the trials that fit cannot be counted; give the number to run at once (each "
            f"trial: {workers_per_trial} worker(s) of {need})"
        )
    count = max(1, most, now)
    how = (
        f"what the cluster can scale to ({most}, from {limits.source})"
        if limits.autoscaling
        else (f"what the cluster holds ({max(most, now)}, from {limits.source})")
    )
    return count, how


def cluster_limits() -> ClusterLimits | None:
    """The running cluster's limits: the GCS's cluster config, else the head's bootstrap file, else None."""
    try:
        import ray._private.state

        limits = limits_from_gcs(ray._private.state.state.get_cluster_config())
    except Exception:  # a private API: an older or newer Ray without it reads the file below
        limits = None
    if limits is not None:
        return limits
    path = Path(os.path.expanduser(BOOTSTRAP_CONFIG))
    if path.is_file():
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return None
        if isinstance(config, dict):
            return limits_from_cluster_config(config, str(path))
    return None


def on_kuberay() -> bool:
    return os.environ.get(KUBERAY_ENV) == "1"
