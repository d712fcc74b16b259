"""One Ray head for the test session, in processes of its own, for CLI runs to join.

A CLI run with ``cluster.address: local`` starts an embedded Ray and stops it again: about 9 s
of its 13 s on 2 cores, against under 1 s to join a running head. Tests whose subject is not
the embedded start (how a run reads, writes, resumes, refuses) join this head instead:
``cluster.address: auto`` with ``RAY_ADDRESS`` in the environment, as a job on a real cluster
does. Tests about the embedded Ray itself (its start-up time, a driver killed together with the
Ray it started) keep ``local``.

The head runs under ``ray start --head --block`` in a session of its own with a private
``RAY_TMPDIR``, so that it neither advertises itself to other ``ray.init()`` calls on the
machine nor outlives the tests: SIGTERM stops it, SIGKILL of its process group stops the rest.
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

STARTUP = str(Path(__file__).resolve().parent / "_startup")  # the torchvision shim, for workers
ROOT = str(Path(__file__).resolve().parents[1])


@dataclass(frozen=True)
class SharedRay:
    """A running head: its GCS ``address`` and the environment a driver joins it with."""

    address: str
    env: dict[str, str]

    def environ(self, **extra: str) -> dict[str, str]:
        """``os.environ`` with this head's variables (and ``extra``) for a CLI subprocess."""
        return {**os.environ, **self.env, **extra}


def job_env_vars(*keys: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment that hands ``keys`` of ``environ`` to the workers of every driver started
    with it, through the job's runtime env (what a Ray job submission does with its own): the
    head's workers do not inherit a driver's environment, as an embedded Ray's do. For a test
    that points the drivers at a server it started (S3) or changes the workers' tools."""
    env_vars = {k: environ[k] for k in keys if k in environ}
    return {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"env_vars": env_vars}})}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def shared_ray_head(num_cpus: int = 2, timeout: float = 120.0) -> Iterator[SharedRay]:
    """Start a ``num_cpus`` head with no GPU; yield it; stop every process it started.

    Its workers import ``tests/_startup`` (the torchvision shim) and this checkout first:
    ``PYTHONPATH`` of the raylet is every worker's.
    """
    tmp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Unix socket paths
    port = _free_port()
    pythonpath = os.pathsep.join(p for p in (ROOT, STARTUP, os.environ.get("PYTHONPATH")) if p)
    base = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env = {**os.environ, **base, "RAY_TMPDIR": str(tmp), "PYTHONPATH": pythonpath}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block"]
    cmd += [f"--port={port}", f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={tmp}"]
    cmd += ["--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats"]
    cmd += [
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
    ]
    cmd += [f"--metrics-export-port={_free_port()}"]
    log = tmp / "ray-start.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start --head failed:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        address = f"127.0.0.1:{port}"
        yield SharedRay(address, {**base, "RAY_ADDRESS": address})
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only this head's processes
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
