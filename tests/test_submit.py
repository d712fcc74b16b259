"""``occlusion-audit submit``: ids, entrypoint and runtime env, then real jobs on a local Ray head.

The head runs with token authentication on (``RAY_AUTH_MODE=token``, a token file of its own) in
its own temp dir and ports, so an embedded Ray elsewhere in the test session is not touched; it is
stopped by signalling the ``ray start --block`` process this module started, never ``ray stop``.
Submissions run as child processes with the head's environment, the way a CronJob pod or a shell
would run them, so each sees the token exactly as Ray's client reads it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from pipeline.cluster import submit as submit_mod
from pipeline.cluster.cli import add_submit_parser
from pipeline.cluster.submit import (
    EXIT_DUPLICATE,
    SCHEDULE_TIME_ENV,
    UPLOAD_EXCLUDES,
    build_entrypoint,
    build_runtime_env,
    parse_schedule_time,
    scheduled_submission_id,
)

ROOT = Path(__file__).resolve().parents[1]
UTC = timezone.utc
_PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
)
_DRIVER = "import json, sys\nfrom pipeline.cluster.submit import submit_entrypoint\n"
_DRIVER += "sys.exit(submit_entrypoint(**json.loads(sys.argv[1])))\n"


def _minimal_config(folder: Path, **sections: Any) -> Path:
    data = {"name": "val", "dataset": {"manifest": "m.csv"}, "model": {"torchscript": "m.pt"}}
    data.update(sections)
    path = folder / "audit.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# --- ids, entrypoint, runtime env: no cluster needed -------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-03-01T02:00Z", datetime(2025, 3, 1, 2, 0, tzinfo=UTC)),
        ("2025-03-01T02:00:59.9", datetime(2025, 3, 1, 2, 0, tzinfo=UTC)),  # naive = UTC, floored
        ("2025-03-01T04:00+02:00", datetime(2025, 3, 1, 2, 0, tzinfo=UTC)),
        ("occlusion-audit-nightly-29013240", datetime(2025, 3, 1, 2, 0, tzinfo=UTC)),
    ],
)
def test_parse_schedule_time(text: str, expected: datetime) -> None:
    assert parse_schedule_time(text) == expected


@pytest.mark.parametrize("text", ["yesterday", "nightly-12", "29013240", "Nightly-29013240"])
def test_parse_schedule_time_rejects_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"ISO 8601.*CronJob"):
        parse_schedule_time(text)


def test_cronjob_job_name_gives_back_its_scheduled_minute() -> None:
    # The CronJob controller names a Job <cronjob>-<scheduled time in minutes since the epoch>.
    scheduled = datetime(2025, 3, 1, 2, 0, tzinfo=UTC)
    job_name = f"occlusion-audit-nightly-{int(scheduled.timestamp()) // 60}"
    assert scheduled_submission_id("val", parse_schedule_time(job_name)) == (
        "occlusion-audit-val-20250301-0200"
    )


def test_submission_id_is_one_per_scheduled_minute() -> None:
    t = datetime(2025, 3, 1, 2, 0, 5, tzinfo=UTC)
    same = scheduled_submission_id("val", t + timedelta(seconds=50))
    assert scheduled_submission_id("val", t) == same == "occlusion-audit-val-20250301-0200"
    assert scheduled_submission_id("val", t + timedelta(minutes=1)) != same
    local = datetime(2025, 3, 1, 3, 0, tzinfo=timezone(timedelta(hours=1)))
    assert scheduled_submission_id("val", local) == same  # ids are in UTC
    assert scheduled_submission_id("a b/c", t) == "occlusion-audit-a-b-c-20250301-0200"


def test_entrypoint_is_a_quoted_cli_call() -> None:
    entry = build_entrypoint("my jobs/a.yaml", ["--set", "name=x y", "--resume"])
    assert entry.startswith("python -m pipeline run ")
    assert shlex.split(entry)[4:] == ["my jobs/a.yaml", "--set", "name=x y", "--resume"]


def test_runtime_env_uploads_the_current_dir_without_local_clutter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "jobs").mkdir()
    config = _minimal_config(tmp_path / "jobs")
    monkeypatch.chdir(tmp_path)
    env, relative = build_runtime_env("jobs/audit.yaml", {"excludes": ["big/", ".venv/"]})
    assert (env["working_dir"], relative) == (str(tmp_path), "jobs/audit.yaml")
    assert env["excludes"] == ["big/", *UPLOAD_EXCLUDES]  # user's first, no duplicates
    env, relative = build_runtime_env(str(config), {"working_dir": "/nonexistent"}, "jobs")
    assert (env["working_dir"], relative) == (str(tmp_path / "jobs"), "audit.yaml")


def test_runtime_env_refuses_a_config_that_would_not_be_uploaded(tmp_path: Path) -> None:
    config = _minimal_config(tmp_path)
    (tmp_path / "wd").mkdir()
    with pytest.raises(ValueError, match="outside the working dir"):
        build_runtime_env(str(config), None, str(tmp_path / "wd"))


def test_cli_arguments_reach_submit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(submit_mod, "submit", lambda *a, **kw: seen.update(a=a, kw=kw) or 0)
    (tmp_path / "env.yaml").write_text("env_vars: {A: '1'}\n")
    parser = argparse.ArgumentParser()
    add_submit_parser(parser.add_subparsers(dest="command"))
    argv = ["submit", "c.yaml", "--address", "http://h:8265", "--wait", "--set", "a=1"]
    argv += ["--resume", "--schedule-time", "2025-03-01T02:00Z"]
    argv += ["--runtime-env", str(tmp_path / "env.yaml"), "--quiet"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert seen["a"] == ("c.yaml", "http://h:8265")
    kw = seen["kw"]
    assert kw["wait"] and kw["runtime_env"] == {"env_vars": {"A": "1"}}
    assert kw["extra_args"] == ["--set", "a=1", "--resume", "--quiet"]
    assert kw["schedule_time"] == datetime(2025, 3, 1, 2, 0, tzinfo=UTC)


def test_schedule_time_from_the_environment_names_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(
        submit_mod, "submit_entrypoint", lambda address, entry, **kw: calls.append(kw) or 0
    )
    config = _minimal_config(tmp_path, cluster={"address": "auto"})
    monkeypatch.setenv(SCHEDULE_TIME_ENV, "occlusion-audit-nightly-29013240")
    assert submit_mod.submit(str(config), "http://h:8265", working_dir=str(tmp_path)) == 0
    assert calls[-1]["submission_id"] == "occlusion-audit-val-20250301-0200"
    assert calls[-1]["metadata"] == {"config": "val", "schedule_time": "2025-03-01T02:00:00+00:00"}
    submit_mod.submit(str(config), "h", working_dir=str(tmp_path), submission_id="mine")
    assert calls[-1]["submission_id"] == "mine"  # an explicit id wins
    monkeypatch.delenv(SCHEDULE_TIME_ENV)
    submit_mod.submit(str(config), "h", working_dir=str(tmp_path), extra_args=["--set", "name=x"])
    assert calls[-1]["submission_id"] is None  # unscheduled: Ray picks one
    assert calls[-1]["metadata"] == {"config": "x"}  # --set reaches validation


def test_invalid_config_fails_before_anything_is_submitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(submit_mod, "submit_entrypoint", lambda *a, **kw: pytest.fail("submitted"))
    config = _minimal_config(tmp_path, occlusion={"windw": [8, 8]})
    with pytest.raises(ValueError, match="windw"):
        submit_mod.submit(str(config), "h", working_dir=str(tmp_path))


class _FlakyStreamClient:
    """A job client whose log stream breaks after one chunk, like a proxy dropping websockets."""

    def __init__(self) -> None:
        self.statuses = iter(["RUNNING", "SUCCEEDED"])

    async def tail_job_logs(self, job_id: str) -> Any:
        yield "line 1\n"
        raise RuntimeError("websocket closed")

    def get_job_status(self, job_id: str) -> Any:
        from ray.job_submission import JobStatus

        return JobStatus(next(self.statuses))

    def get_job_logs(self, job_id: str) -> str:
        return "line 1\nline 2\n"


def test_waiting_falls_back_to_polling_without_repeating_logs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(submit_mod, "_POLL_S", 0.0)
    stream = io.StringIO()
    status = submit_mod._follow(_FlakyStreamClient(), "job", stream)
    assert str(status) == "SUCCEEDED"
    assert stream.getvalue() == "line 1\nline 2\n"


# --- a real head, token auth on -----------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    address: str  # dashboard URL
    env: dict[str, str]  # environment of a client holding the token


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_port_range(size: int) -> int:
    rng = np.random.default_rng()
    for _ in range(50):
        base = int(rng.integers(20000, 40000))
        try:
            for port in range(base, base + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no free range of {size} ports")


def _wait_for_jobs_api(address: str, token: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    request = urllib.request.Request(
        f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"}
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"the Ray dashboard did not answer within 180 s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    temp_dir = Path(tempfile.mkdtemp(prefix="oa-ray-", dir="/tmp"))  # short: socket paths
    token = secrets.token_hex(16)
    token_file = temp_dir / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API"))}
    env.pop("RAY_AUTH_TOKEN", None)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # job's `python`
        # The job's driver runs `python -m pipeline` from its uploaded working dir: make this
        # checkout importable there, as the image's installed package is on a real cluster.
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
    workers = _free_port_range(40)
    ray_exe = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    cmd = [ray_exe, "start", "--head", "--block", f"--temp-dir={temp_dir}", "--num-cpus=2"]
    cmd += ["--num-gpus=0", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1"]
    cmd += ["--include-dashboard=true", "--disable-usage-stats", "--object-store-memory=150000000"]
    cmd += [f"{flag}={port}" for flag, port in ports.items()]
    cmd += [f"--min-worker-port={workers}", f"--max-worker-port={workers + 39}"]
    log = temp_dir / "ray-start.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        _wait_for_jobs_api(address, token, proc, log)
        yield Head(address, env)
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only this head's processes
            proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _run(
    argv: Sequence[str], env: dict[str, str], cwd: Path, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def _submit_raw(head: Head, tmp_path: Path, entrypoint: str, **kw: Any) -> Any:
    kw = {"address": head.address, "entrypoint": entrypoint, "wait": True, **kw}
    kw.setdefault("runtime_env", {"working_dir": str(tmp_path)})
    return _run(["-c", _DRIVER, json.dumps(kw)], head.env, tmp_path)


@pytest.mark.slow
def test_a_job_that_succeeds_exits_0_with_its_logs(head: Head, tmp_path: Path) -> None:
    out = _submit_raw(head, tmp_path, "python -c \"print('audit-ok')\"")
    assert out.returncode == 0, out.stderr
    assert "audit-ok" in out.stdout and "SUCCEEDED" in out.stdout


@pytest.mark.slow
def test_a_job_that_fails_exits_1(head: Head, tmp_path: Path) -> None:
    out = _submit_raw(head, tmp_path, "python -c \"import sys; print('boom'); sys.exit(4)\"")
    assert out.returncode == 1, out.stderr
    assert "boom" in out.stdout and "FAILED" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("token", [None, "not-the-token"], ids=["no-token", "wrong-token"])
def test_the_head_refuses_clients_without_its_token(
    head: Head, tmp_path: Path, token: str | None
) -> None:
    env = {k: v for k, v in head.env.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    if token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    out = _run(["-c", _DRIVER, json.dumps({"address": head.address, "entrypoint": "true"})],
               env, tmp_path)  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert "rejected" in out.stderr


@pytest.mark.slow
def test_second_submission_of_a_scheduled_run_is_refused(head: Head, tmp_path: Path) -> None:
    config = _minimal_config(tmp_path, cluster={"address": "auto"})
    argv = ["-m", "pipeline", "submit", str(config), "--address", head.address]
    argv += ["--schedule-time", "2025-03-01T02:00:30Z"]
    first = _run(argv, head.env, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "occlusion-audit-val-20250301-0200" in first.stdout
    again = _run([*argv[:-1], "2025-03-01T02:00Z"], head.env, tmp_path)  # same minute
    assert again.returncode == EXIT_DUPLICATE, again.stdout + again.stderr
    assert "occlusion-audit-val-20250301-0200 already exists" in again.stderr


def _tiny_dataset(root: Path, n: int = 6) -> None:
    """n 32x32 RGB images in two rooms, a centre-square mask each, a manifest and a TorchScript."""
    (root / "data" / "images").mkdir(parents=True)
    (root / "data" / "masks").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[8:24, 8:24] = 255
        Image.fromarray(image).save(root / "data" / "images" / f"im{i}.png")
        Image.fromarray(mask).save(root / "data" / "masks" / f"im{i}.png")
        rows.append({"image_id": f"im{i}", "path": f"images/im{i}.png", "room": f"r{i % 2}",
                     "label": i % 2, "mask_path": f"masks/im{i}.png"})  # fmt: skip
    pd.DataFrame(rows).to_parquet(root / "data" / "manifest.parquet")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 2))  # fmt: skip
    torch.jit.save(torch.jit.script(net.eval()), root / "model.pt")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # TorchScript is what we test
def test_submitted_audit_runs_to_success_and_writes_its_outputs(head: Head, tmp_path: Path) -> None:
    work = tmp_path / "work"  # uploaded: config, data and model travel with the job
    _tiny_dataset(work)
    out_dir = tmp_path / "out"
    config = {
        "name": "e2e-audit",
        "dataset": {"manifest": "data/manifest.parquet", "group_by": ["room"],
                    "image_size": [32, 32]},
        "model": {"torchscript": "model.pt"},
        "occlusion": {"window": [8, 8], "stride": [8, 8], "baseline": "zero"},
        "cluster": {"address": "auto", "actors": 1, "shard_size": 4},
        "audit": {"min_images": 2, "bootstrap": 50},
        "output": {"dir": str(out_dir / "run"), "report_dir": str(out_dir / "report")},
    }  # fmt: skip
    (work / "audit.yaml").write_text(yaml.safe_dump(config))
    argv = ["-m", "pipeline", "submit", "audit.yaml", "--address", head.address, "--wait"]
    argv += ["--schedule-time", datetime.now(UTC).isoformat(), "--quiet"]
    out = _run(argv, head.env, work)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "SUCCEEDED" in out.stdout
    assert (out_dir / "run" / "run.json").is_file()
    maps = pq.read_table(out_dir / "run" / "maps", columns=["image_id", "status"]).to_pydict()
    assert sorted(maps["image_id"]) == [f"im{i}" for i in range(6)]
    assert set(maps["status"]) == {"ok"}
    assert (out_dir / "report" / "index.html").is_file()
