"""What a Ray cluster can give an actor pool: the nodes that are up, and the node types its
autoscaler can start.

A cluster that scales from zero (``cluster.yaml``, the KubeRay jobs) shows no GPU in
``ray.cluster_resources()`` until a GPU node has started, so sizing a pool from what is up
asks a cold cluster for CPU actors. The autoscaler's node types say what can come. Ray exposes
them in its GCS cluster config (``ray._private.state.state.get_cluster_config()``, the source
Ray Train and Ray Data use) where the autoscaler reports it; the autoscaler that
``ray start --autoscaling-config`` (and the cluster launcher) starts on the head reads them from
a file whose path is on its command line, which a driver on the head can read. Where neither
is available but an autoscaler runs, the node types are unknown (``node_types is None``).

The parsers of deployment files (:func:`node_types_from_launcher`, :func:`node_types_from_kuberay`)
let ``inspect --cluster FILE`` and the tests plan the pool a shipped deployment leads to.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ClusterOffer",
    "NodeType",
    "actor_threads",
    "node_types_from_file",
    "node_types_from_kuberay",
    "node_types_from_launcher",
    "read_offer",
]

UNBOUNDED = -1  # a node type's max_count without a limit


@dataclass(frozen=True)
class NodeType:
    """A kind of worker node the autoscaler can start.

    Attributes:
        name: the node type (launcher) or worker group (KubeRay).
        resources: what one such node gives Ray (``CPU``, ``GPU``, ...).
        max_count: the most such nodes, or :data:`UNBOUNDED`.
    """

    name: str
    resources: Mapping[str, float]
    max_count: int

    def describe(self) -> str:
        shown = ", ".join(
            f"{k}: {_num(v)}" for k, v in sorted(self.resources.items()) if k in ("CPU", "GPU")
        )
        most = "any number" if self.max_count == UNBOUNDED else f"up to {self.max_count}"
        return f"{self.name} ({most} x {{{shown}}})"


@dataclass(frozen=True)
class ClusterOffer:
    """The cluster as a pool planner sees it.

    Attributes:
        nodes: the resources of each live node (head included).
        node_types: what the autoscaler can start; ``()`` where no autoscaler runs; None where
            one runs but its node types are not known.
        source: where ``node_types`` came from, in words.
    """

    nodes: tuple[Mapping[str, float], ...]
    node_types: tuple[NodeType, ...] | None = ()
    source: str = "no autoscaler"

    def total(self, key: str) -> float:
        """``key`` (``"GPU"``, ``"CPU"``) summed over the live nodes."""
        return float(sum(float(n.get(key, 0) or 0) for n in self.nodes))

    def slots(self, key: str, per_actor: float) -> int | None:
        """How many actors asking ``per_actor`` of ``key`` the cluster can hold at most: the
        larger of what the live nodes hold and what the node types can start (None: no limit
        is known, because an autoscaler runs with unknown or unbounded node types)."""
        live = sum(int(float(n.get(key, 0) or 0) // per_actor) for n in self.nodes)
        if self.node_types is None:
            return None
        startable = 0
        for t in self.node_types:
            each = int(float(t.resources.get(key, 0) or 0) // per_actor)
            if each and t.max_count == UNBOUNDED:
                return None
            startable += each * max(0, t.max_count)
        return max(live, startable)

    def can_offer(self, key: str) -> bool | None:
        """Whether any node has or can have ``key``; None when the node types are unknown."""
        if self.total(key) > 0:
            return True
        if self.node_types is None:
            return None
        return any(float(t.resources.get(key, 0) or 0) > 0 and t.max_count for t in self.node_types)

    def per_node(self, key: str, per: str) -> list[float]:
        """``key`` per unit of ``per`` on every live node and node type that has ``per``
        (CPUs per GPU, say)."""
        out = []
        for r in [*self.nodes, *(t.resources for t in self.node_types or ())]:
            units = float(r.get(per, 0) or 0)
            if units > 0:
                out.append(float(r.get(key, 0) or 0) / units)
        return out

    def describe(self) -> str:
        """One line: what is up and what the autoscaler can start."""
        up = (
            f"{len(self.nodes)} node(s) up with {_num(self.total('GPU'))} GPU(s) and "
            f"{_num(self.total('CPU'))} CPU(s)"
        )
        if self.node_types is None:
            return f"{up}; {self.source}"
        if not self.node_types:
            return f"{up}; {self.source}"
        kinds = "; ".join(t.describe() for t in self.node_types)
        return f"{up}; node types ({self.source}): {kinds}"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def actor_threads(plan_gpus: float, plan_cpus: float, node: Mapping[str, float]) -> int:
    """Torch threads of an actor on ``node`` (its total resources): a GPU actor takes its share
    of the node's CPUs (8 on a node with 8 CPUs and 1 GPU), a CPU actor the CPUs it asked for."""
    gpus, cpus = float(node.get("GPU", 0) or 0), float(node.get("CPU", 0) or 0)
    if plan_gpus > 0 and gpus > 0:
        return max(1, int(cpus * plan_gpus / gpus))
    return max(1, int(plan_cpus))


def read_offer() -> ClusterOffer:
    """The offer of the Ray cluster this process is connected to (``ray.init`` done)."""
    import ray

    nodes = tuple(
        {k: float(v) for k, v in n.get("Resources", {}).items()}
        for n in ray.nodes()
        if n.get("Alive")
    )
    types, source = _autoscaler_node_types()
    return ClusterOffer(nodes, types, source)


def _autoscaler_node_types() -> tuple[tuple[NodeType, ...] | None, str]:
    """The node types of the connected cluster's autoscaler, and where they came from."""
    import ray._private.state as state

    reported = None
    # a Ray without the call, or a GCS without the key: the node types are just not reported
    with contextlib.suppress(Exception):
        reported = state.state.get_cluster_config()
    if reported is not None and len(reported.node_group_configs):
        types = tuple(
            NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count))
            for g in reported.node_group_configs
        )
        return types, "Ray's cluster config"
    monitor = _monitor_args()
    if monitor is not None:
        path = next(
            (a.partition("=")[2] for a in monitor if a.startswith("--autoscaling-config=")), None
        )
        if path is None:  # the head's monitor only watches: no node can be started
            return (), "no autoscaler"
        path = os.path.expanduser(path)
        try:
            return node_types_from_file(path), f"the autoscaler's config {path}"
        except (OSError, ValueError) as e:
            return None, f"an autoscaler runs, but its config {path} cannot be read ({e})"
    if _autoscaler_reports():
        return None, "an autoscaler runs, but Ray does not say which node types it can start"
    return (), "no autoscaler"


def _autoscaler_reports() -> bool:
    """Whether an autoscaler that can start nodes reports to the GCS. Every head's monitor
    writes a status; one that only watches names each live node's type ``node_<node id>``."""
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        status = json.loads(_internal_kv_get("__autoscaling_status") or b"{}")
    except Exception:  # no GCS key, or not JSON: nothing says an autoscaler runs
        return False
    report = status.get("autoscaler_report") or {}
    kinds = {*(report.get("active_nodes") or {}), *(report.get("pending_launches") or {})}
    return any(not re.fullmatch(r"node_[0-9a-f]+", str(k)) for k in kinds)


def _monitor_args() -> list[str] | None:
    """The command line of the autoscaler monitor of this driver's Ray session, when it runs on
    this machine (a driver on the head: jobs, ``submit``, the launcher); else None."""
    import ray._private.worker as worker

    node = getattr(worker, "_global_node", None)
    session = node.get_session_dir_path() if node is not None else None
    if not session or not os.path.isdir("/proc"):
        return None
    logs = f"--logs-dir={os.path.join(session, 'logs')}"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue  # gone, or not ours to read
        if logs in args and any(a.endswith("monitor.py") for a in args):
            return args
    return None


def node_types_from_file(path: str) -> tuple[NodeType, ...]:
    """The worker node types of a cluster launcher config (``cluster.yaml``, JSON too), or of a
    KubeRay ``RayCluster``, ``RayJob`` or ``RayCronJob`` manifest.

    Raises:
        ValueError: the file is neither.
    """
    import yaml

    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if isinstance(d, dict)]
    for doc in docs:
        if "available_node_types" in doc:
            return node_types_from_launcher(doc)
        if str(doc.get("apiVersion", "")).startswith("ray.io/"):
            return node_types_from_kuberay(doc)
    raise ValueError(
        f"{path} is neither a Ray cluster launcher config (available_node_types) nor a "
        "KubeRay RayCluster, RayJob or RayCronJob"
    )


def node_types_from_launcher(config: Mapping[str, Any]) -> tuple[NodeType, ...]:
    """The worker node types of a cluster launcher config (``available_node_types`` less the
    head's). A type's ``max_workers`` defaults to the cluster's ``max_workers``."""
    head = config.get("head_node_type")
    cap = int(config.get("max_workers", UNBOUNDED))
    return tuple(
        NodeType(
            name,
            {k: float(v) for k, v in (spec.get("resources") or {}).items()},
            int(spec.get("max_workers", cap)),
        )
        for name, spec in (config.get("available_node_types") or {}).items()
        if name != head
    )


def node_types_from_kuberay(manifest: Mapping[str, Any]) -> tuple[NodeType, ...]:
    """The worker groups of a KubeRay ``RayCluster``, ``RayJob`` or ``RayCronJob``.

    A group's CPUs and GPUs are what KubeRay gives Ray: ``rayStartParams`` ``num-cpus`` /
    ``num-gpus`` where set, else the Ray container's limits (``cpu``, ``nvidia.com/gpu``).
    """
    spec = manifest.get("spec") or {}
    for key in ("jobTemplate", "rayJobTemplate"):  # RayCronJob wraps a RayJob spec
        if isinstance(spec.get(key), Mapping):
            spec = spec[key].get("spec", spec[key])
    spec = spec.get("rayClusterSpec", spec)
    return tuple(_worker_group(g) for g in spec.get("workerGroupSpecs") or ())


def _worker_group(group: Mapping[str, Any]) -> NodeType:
    params = group.get("rayStartParams") or {}
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    limits = (containers[0].get("resources") or {}).get("limits") or {}
    cpus = params.get("num-cpus", limits.get("cpu", 0))
    gpus = params.get("num-gpus", limits.get("nvidia.com/gpu", 0))
    count = group.get("maxReplicas", group.get("replicas", 0))
    return NodeType(
        str(group.get("groupName", "workers")),
        {"CPU": _k8s_quantity(cpus), "GPU": float(gpus)},
        int(count) * int(group.get("numOfHosts", 1)),
    )


def _k8s_quantity(value: Any) -> float:
    """A Kubernetes CPU quantity (``"7"``, ``"500m"``) as a number of CPUs."""
    text = str(value).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m?)", text)
    if m is None:
        raise ValueError(f"not a CPU quantity: {text!r}")
    return float(m.group(1)) / (1000 if m.group(2) else 1)
