"""A real Ray autoscaler on loopback: Ray's fake multi-node provider, started by hand.

``ray start --head --autoscaling-config=...`` with ``RAY_FAKE_CLUSTER=1`` runs Ray's own
autoscaler (the monitor) with provider ``fake_multinode``: the nodes it launches are local raylets
with whatever resources their node type declares, ``GPU`` included. This is what
``ray.cluster_utils.AutoscalingCluster`` builds, without its ``ray stop --force`` (which kills
every Ray on the machine): the head starts in its own process group on free ports, and only that
group is killed at the end. Worker nodes are children of the head's monitor, so they are in the
group too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FakeCluster", "autoscaling_cluster", "kill_node", "worker_node_ids"]

_EMPTY_LISTS = (
    "head_setup_commands",
    "worker_setup_commands",
    "setup_commands",
    "initialization_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
    "cluster_synced_files",
    "rsync_exclude",
    "rsync_filter",
)


@dataclass(frozen=True)
class FakeCluster:
    """A running head with an autoscaler: its GCS address, its process group and its config."""

    address: str
    pgid: int
    config_path: Path  # in the head's temporary folder, which holds its session folder
    env: Mapping[str, str]  # what a driver process needs (RAY_ADDRESS, auth mode)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(gcs: str, worker_types: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    types: dict[str, Any] = {
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}
    }
    for name, spec in worker_types.items():
        types[name] = {"node_config": {}, "min_workers": 0, **spec}
    cfg: dict[str, Any] = {
        "cluster_name": "fake-autoscaling",
        "max_workers": sum(int(t.get("max_workers", 0)) for t in worker_types.values()),
        "upscaling_speed": 10.0,
        # A node idle this long goes (0.15 min = 9 s). Fake nodes share this machine's IP, and
        # the autoscaler sees a killed node idle from its last report on: it is terminated after
        # this and replaced while an actor waits for it, as a preempted cloud node is.
        "idle_timeout_minutes": 0.15,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs,  # the nodes join this head, not a default port on the machine
            "disable_launch_config_check": True,
            "disable_node_updaters": True,
            "launch_multiple": True,  # every node a scale-up asks for in one launch
            # every fake node has this machine's IP: the autoscaler tells them apart by node id
            "use_node_id_as_ip": True,
        },
        "auth": {"ssh_user": "ray"},
        "head_node_type": "ray.head.default",
        "available_node_types": types,
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }
    cfg.update({key: [] for key in _EMPTY_LISTS})
    return cfg


@contextlib.contextmanager
def autoscaling_cluster(
    worker_types: Mapping[str, Mapping[str, Any]], env: Mapping[str, str] | None = None
) -> Iterator[FakeCluster]:
    """A head with 0 CPUs and an autoscaler that starts ``worker_types`` nodes from zero.

    Args:
        worker_types: node type name -> ``{"resources": {...}, "max_workers": N}``.
        env: extra environment of the head, its autoscaler and every node it starts.

    Yields:
        The cluster; its nodes, actors and autoscaler die with it.
    """
    tmp = Path(tempfile.mkdtemp(prefix="ra", dir="/tmp"))  # short: Unix socket paths
    gcs = f"127.0.0.1:{_free_port()}"
    config_path = tmp / "autoscaling.json"
    config_path.write_text(json.dumps(_config(gcs, worker_types)))
    head_env = {
        **os.environ,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        # a node that stops answering is replaced after 5 s instead of 30 s
        "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "5",
        # and the GCS declares a silent node dead after about 5 s instead of 15-30 s
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "5",
        "AUTOSCALER_METRIC_PORT": str(_free_port()),
        "RAY_AUTH_MODE": "disabled",
        "RAY_TMPDIR": str(tmp),
        "RAY_USAGE_STATS_ENABLED": "0",
        **(env or {}),
    }
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    head = subprocess.Popen(
        [
            *ray_cli,
            "start",
            "--head",
            f"--port={gcs.rsplit(':', 1)[1]}",
            "--num-cpus=0",
            "--num-gpus=0",
            f"--autoscaling-config={config_path}",
            f"--temp-dir={tmp}",
            "--include-dashboard=false",
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            "--disable-usage-stats",
        ],
        env=head_env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    pgid = head.pid
    try:
        out, _ = head.communicate(timeout=120)
        if head.returncode != 0:
            raise RuntimeError(f"ray start --head failed:\n{out[-3000:]}")
        yield FakeCluster(gcs, pgid, config_path, {"RAY_ADDRESS": gcs, "RAY_AUTH_MODE": "disabled"})
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.2)
        shutil.rmtree(tmp, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _cmdlines() -> Iterator[tuple[int, list[bytes]]]:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            yield int(pid), Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def worker_node_ids(cluster: FakeCluster) -> list[str]:
    """The node ids of the worker nodes of ``cluster`` that run now (their raylets' command
    lines), without joining the cluster as a driver."""
    session = f"--session_dir={cluster.config_path.parent}/".encode()
    ids = []
    for _, args in _cmdlines():
        if any(a.startswith(session) for a in args) and any(a.endswith(b"/raylet") for a in args):
            node = next(a for a in args if a.startswith(b"--node_id=")).decode().partition("=")[2]
            if not node.endswith("00000"):  # the fake provider's head node id
                ids.append(node)
    return sorted(ids)


def kill_node(node_id: str) -> int:
    """SIGKILL the raylet of Ray node ``node_id`` and its worker processes, as a preempted
    machine would go; return how many processes were killed."""
    flag = f"--node_id={node_id}".encode()
    raylets = [pid for pid, args in _cmdlines() if flag in args]
    children = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid in raylets:
                children.append(int(pid))
    for pid in raylets + children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(raylets) + len(children)
