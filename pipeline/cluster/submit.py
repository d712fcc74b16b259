"""Run an audit on a Ray cluster as a Ray job: the submission behind ``occlusion-audit submit``.

The job's entrypoint is ``python -m pipeline run CONFIG`` (the same ``pipeline.cli.main`` as the
console script), run from an uploaded working directory: the current directory unless told
otherwise, without ``.venv/``, ``.git/``, ``runs/`` and ``reports/``.

Submission ids. A scheduled run gets a deterministic id, ``occlusion-audit-<config name>-<YYYYMMDD>-
<HHMM>`` (scheduled time in UTC, floored to the minute), from ``--schedule-time`` or the
``OCCLUSION_AUDIT_SCHEDULE_TIME`` environment variable. Ray refuses a second job with an id it has
seen, so a schedule that fires twice (a retried pod, a manual re-run of the same night) cannot start
the same audit twice: ``submit`` exits 3 and names the existing job. With neither, Ray picks an id.
A schedule time is ISO 8601 (naive means UTC) or the name of a Job made by a Kubernetes CronJob,
``<cronjob>-<minutes since the Unix epoch>``: the CronJob controller derives that suffix from the
scheduled time, and ``jobs/cronjob.yaml`` hands the name to the pod through the downward API.

Authentication. Ray's own client reads ``RAY_AUTH_MODE=token`` and the token (``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) and sends it with every request; nothing here
turns authentication off. A rejected token exits 2 with Ray's explanation.

Exit codes: 0 submitted (with ``--wait``: SUCCEEDED); 1 FAILED or STOPPED; 2 not submitted
(cluster unreachable, token rejected); 3 duplicate submission id; 130 interrupted while waiting.

The command line (arguments, the ``submit`` subcommand) is :mod:`pipeline.cluster.cli`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import yaml

from pipeline.exit_codes import (
    EXIT_DUPLICATE_JOB,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
)

__all__ = [
    "EXIT_DUPLICATE",
    "SCHEDULE_TIME_ENV",
    "UPLOAD_EXCLUDES",
    "build_entrypoint",
    "build_runtime_env",
    "parse_schedule_time",
    "scheduled_submission_id",
    "submit",
    "submit_entrypoint",
]

SCHEDULE_TIME_ENV = "OCCLUSION_AUDIT_SCHEDULE_TIME"  # scheduled time of this run (see above)
ID_PREFIX = "occlusion-audit"
# gitignore-style patterns, relative to the working dir; Ray also honours .gitignore there.
UPLOAD_EXCLUDES = (".venv/", ".git/", "/runs/", "/reports/", "__pycache__/", ".*_cache/")
EXIT_NOT_SUBMITTED = EXIT_USAGE  # unreachable, token refused, invalid config
EXIT_DUPLICATE = EXIT_DUPLICATE_JOB
_POLL_S = 1.0  # status/log polling period when the log stream is unavailable
_CRON_JOB_NAME = re.compile(r"[a-z0-9][a-z0-9.-]*-(\d{7,})")  # <cronjob>-<epoch minutes>


def parse_schedule_time(value: str) -> datetime:
    """A scheduled time in UTC, floored to the minute.

    Args:
        value: ISO 8601 (``2025-03-01T02:00Z``; naive means UTC) or a Kubernetes CronJob's Job
            name ``<cronjob>-<minutes since the Unix epoch>``.

    Example:
        >>> parse_schedule_time("nightly-29013240").isoformat()
        '2025-03-01T02:00:00+00:00'
    """
    text = value.strip()
    try:  # Python 3.10's fromisoformat does not read a "Z" suffix
        when = datetime.fromisoformat(re.sub(r"[zZ]$", "+00:00", text))
    except ValueError:
        match = _CRON_JOB_NAME.fullmatch(text)
        if match is None:
            raise ValueError(
                f"schedule time {value!r} is neither ISO 8601 (2025-03-01T02:00Z) nor a CronJob's "
                "Job name (<cronjob>-<minutes since the epoch>)"
            ) from None
        when = datetime.fromtimestamp(int(match.group(1)) * 60, tz=timezone.utc)
    return _utc_minute(when)


def _utc_minute(when: datetime) -> datetime:
    """``when`` in UTC (naive means UTC already), seconds dropped."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).replace(second=0, microsecond=0)


def scheduled_submission_id(name: str, when: datetime) -> str:
    """``occlusion-audit-<name>-<YYYYMMDD>-<HHMM>``, the minute in UTC.

    Example:
        >>> scheduled_submission_id("val", datetime(2025, 3, 1, 2, 0, 59, tzinfo=timezone.utc))
        'occlusion-audit-val-20250301-0200'
    """
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "audit"
    return f"{ID_PREFIX}-{slug}-{_utc_minute(when):%Y%m%d-%H%M}"


def build_entrypoint(config: str, extra_args: Sequence[str] = ()) -> str:
    """The job's shell command: ``python -m pipeline run CONFIG [extra_args]``, each part quoted."""
    return shlex.join(["python", "-m", "pipeline", "run", config, *extra_args])


def build_runtime_env(
    config_path: str, runtime_env: Mapping[str, Any] | None = None, working_dir: str | None = None
) -> tuple[dict[str, Any], str]:
    """The job's runtime env and the config's path inside the uploaded working dir.

    The working dir is ``working_dir``, else ``runtime_env["working_dir"]``, else the current
    directory (relative ones resolve against the current directory, as in ``ray job submit``).
    ``UPLOAD_EXCLUDES`` are added to the env's ``excludes``.

    Raises:
        ValueError: the working dir is missing or the config is outside it (it would not be
            uploaded).
    """
    env = dict(runtime_env or {})
    root = Path(working_dir or env.get("working_dir") or os.getcwd()).resolve()
    if not root.is_dir():
        raise ValueError(f"working dir {str(root)!r} is not a directory; pass --working-dir DIR")
    config = Path(config_path).resolve()
    try:
        relative = config.relative_to(root).as_posix()
    except ValueError:
        raise ValueError(
            f"config {str(config)!r} is outside the working dir {str(root)!r}, which is what gets "
            "uploaded to the cluster; run from a folder that contains it or pass --working-dir"
        ) from None
    env["working_dir"] = str(root)
    env["excludes"] = list(dict.fromkeys([*env.get("excludes", []), *UPLOAD_EXCLUDES]))
    return env, relative


def submit_entrypoint(
    address: str | None,
    entrypoint: str,
    *,
    runtime_env: Mapping[str, Any] | None = None,
    submission_id: str | None = None,
    metadata: Mapping[str, str] | None = None,
    wait: bool = False,
    log_stream: IO[str] | None = None,
) -> int:
    """Submit any shell command as a Ray job; with ``wait``, stream its logs until it ends.

    Returns:
        An exit code: 0 submitted or SUCCEEDED, 1 FAILED/STOPPED, 2 not submitted, 3 duplicate id,
        130 interrupted while waiting (the job keeps running).
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    log_stream = log_stream or sys.stdout

    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):  # Ray lets these win over the argument
        if os.environ.get(var) and address and os.environ[var] != address:
            _say(f"note: {var}={os.environ[var]} overrides address {address}", sys.stderr)
            break
    try:
        client = JobSubmissionClient(address)
    except (AuthenticationError, ConnectionError) as e:
        return _not_submitted(e)
    try:
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env=dict(runtime_env or {}),
            submission_id=submission_id,
            metadata=dict(metadata or {}),
        )
    except (AuthenticationError, ConnectionError) as e:
        return _not_submitted(e)
    except RuntimeError as e:
        if submission_id is None or "already exists" not in str(e):
            raise
        try:
            status = f"status {client.get_job_status(submission_id)}"
        except RuntimeError:
            status = "status unknown"
        _say(
            f"error: job {submission_id} already exists on this cluster ({status}): this "
            f"scheduled run was submitted before, so it is not started again. Follow it with "
            f"`ray job logs --follow {submission_id}`, or pass another --submission-id or "
            "--schedule-time to run it again.",
            sys.stderr,
        )
        return EXIT_DUPLICATE
    _say(f"submitted job {job_id}: {entrypoint}", log_stream)
    if not wait:
        return EXIT_OK
    try:
        status = _follow(client, job_id, log_stream)
    except KeyboardInterrupt:
        _say(f"stopped waiting; job {job_id} goes on (`ray job stop {job_id}` ends it)", sys.stderr)
        return EXIT_INTERRUPTED
    _say(f"job {job_id} {status}", log_stream)
    return EXIT_OK if str(status) == "SUCCEEDED" else EXIT_FAILED


def submit(
    config_path: str,
    address: str | None,
    *,
    wait: bool = False,
    submission_id: str | None = None,
    schedule_time: datetime | None = None,
    working_dir: str | None = None,
    runtime_env: dict[str, Any] | None = None,
    extra_args: Sequence[str] = (),
    log_stream: IO[str] | None = None,
) -> int:
    """Submit the audit of ``config_path`` as a Ray job running ``python -m pipeline run``.

    Args:
        config_path: the audit config; validated here first, so mistakes fail before upload.
        address: Ray dashboard (``http://HEAD:8265``); None: ``RAY_ADDRESS`` or a local cluster.
        wait: stream the job's logs and return its outcome.
        submission_id: explicit job id; default: derived from the schedule time (module doc).
        schedule_time: scheduled time of this run; default: ``$OCCLUSION_AUDIT_SCHEDULE_TIME``.
        working_dir: folder uploaded as the job's working dir; must contain the config.
        runtime_env: Ray runtime env (e.g. ``jobs/runtime_env.yaml``); working dir added.
        extra_args: appended to ``run`` (``--set k=v``, ``--resume``).
        log_stream: where submission lines and job logs go (default: stdout).

    Returns:
        The exit code (module doc).

    Example:
        >>> submit("jobs/nightly-audit.yaml", "http://head:8265", wait=True)  # doctest: +SKIP
        0
    """
    from pipeline.config.load import load_config

    overrides = _overrides(extra_args)
    cfg = load_config(config_path, overrides=overrides)
    env, config_in_job = build_runtime_env(config_path, runtime_env, working_dir)
    _notes(config_path, str(cfg.cluster.address), overrides)
    if schedule_time is None and os.environ.get(SCHEDULE_TIME_ENV):
        schedule_time = parse_schedule_time(os.environ[SCHEDULE_TIME_ENV])
    metadata = {"config": cfg.name}
    if schedule_time is not None:
        metadata["schedule_time"] = _utc_minute(schedule_time).isoformat()
        submission_id = submission_id or scheduled_submission_id(cfg.name, schedule_time)
    return submit_entrypoint(
        address,
        build_entrypoint(config_in_job, extra_args),
        runtime_env=env,
        submission_id=submission_id,
        metadata=metadata,
        wait=wait,
        log_stream=log_stream,
    )


def _say(line: str, stream: IO[str]) -> None:
    print(line, file=stream, flush=True)


def _not_submitted(e: Exception) -> int:
    if isinstance(e, ConnectionError):
        _say(f"error: {e} Is the Ray dashboard (port 8265) reachable from here?", sys.stderr)
    else:  # Ray's message says where the token is looked for
        _say(f"error: the cluster rejected the request: {e}", sys.stderr)
    return EXIT_NOT_SUBMITTED


def _overrides(extra_args: Sequence[str]) -> list[str]:
    """The ``--set`` values among ``run`` arguments, to validate the config as the job will."""
    out = [a.split("=", 1)[1] for a in extra_args if a.startswith("--set=")]
    out += [b for a, b in itertools.pairwise(extra_args) if a == "--set"]
    return out


def _notes(config_path: str, address: str, overrides: Sequence[str]) -> None:
    """Warn about settings that make sense locally but not inside a cluster job."""
    with open(config_path, encoding="utf-8") as f:
        output = (yaml.safe_load(f) or {}).get("output") or {}
    for override in overrides:  # an override's value is what the job will see
        dotted, _, text = override.partition("=")
        if dotted.strip().startswith("output."):
            output[dotted.strip()[len("output.") :]] = yaml.safe_load(text)
    for key in ("dir", "report_dir"):
        path = output.get(key)
        if not (isinstance(path, str) and (os.path.isabs(path) or "://" in path)):
            _say(
                f"note: output.{key} is {'unset' if path is None else repr(path)}: in a job it "
                "lands in the job's temporary working dir on the head node; give a shared path",
                sys.stderr,
            )
    if address == "local":
        _say("note: cluster.address is local; jobs should use auto (the job's cluster)", sys.stderr)


def _follow(client: Any, job_id: str, log_stream: IO[str]) -> Any:
    """Stream the job's logs until it ends; return its final ``JobStatus``."""
    import aiohttp

    written = 0  # characters of the log shown so far

    async def tail() -> None:
        nonlocal written
        async for chunk in client.tail_job_logs(job_id):
            log_stream.write(chunk)
            log_stream.flush()
            written += len(chunk)

    try:
        asyncio.run(tail())
        streamed = True
    except (RuntimeError, OSError, aiohttp.ClientError) as e:  # e.g. a proxy without websockets
        _say(f"note: log stream interrupted ({e}); polling instead", sys.stderr)
        streamed = False
    while True:
        status = client.get_job_status(job_id)
        if not streamed:  # get_job_logs returns the whole log so far: show what is new
            logs = client.get_job_logs(job_id)
            log_stream.write(logs[written:])
            log_stream.flush()
            written = len(logs)
        if status.is_terminal():
            return status
        time.sleep(_POLL_S)
