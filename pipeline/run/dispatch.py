"""The shard queue of an elastic pool: shards go to whichever actor is up and free, actors join
as their nodes start, and a lost actor's shard goes back to the queue.

Every actor of the pool is created at once; on a cluster that scales from zero most of them
wait for nodes. Each actor is asked for its ``info()`` from the start: the answer means it is
up (its model loaded), and it gets shards from then on. ``ray.util.ActorPool`` resubmits nothing
after an actor dies, so the driver does it here. An actor whose call failed with a
:class:`ray.exceptions.RayActorError` (its process died, its node was preempted) gets no work
until it answers a probe again: Ray restarts it, on a node the autoscaler may have to start.

Each time an actor comes up and goes away is one entry of the pool's timeline
(:attr:`DispatchOutcome.timeline`, ``run.json`` ``actors``).

Infrastructure failures are never stored as image errors. A shard that keeps failing (actor
deaths past ``max_retries``, or no live actor for ``startup_timeout_s``) is left unstored and
named in :attr:`DispatchOutcome.lost`; a shard whose file cannot be written (a full disk, a
read-only folder) stops the queue, since the next shards would fail the same way. The shards
already stored stay, and ``--resume`` computes the rest.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.run.folder import ShardWriteError
from pipeline.run.progress import Progress

__all__ = ["DispatchOutcome", "NoActorError", "WorkerStartError", "dispatch"]

PROBE_EVERY_S = 1.0  # how often an actor that went away is asked whether it is back


class NoActorError(RuntimeError):
    """No actor came up within the start-up timeout; nothing was computed."""

    def __init__(self, waited_s: float) -> None:
        self.waited_s = waited_s
        super().__init__(f"no actor came up within {waited_s:.0f}s")


class WorkerStartError(RuntimeError):
    """An actor's constructor failed (its model, or a GPU torch cannot see): every actor would
    fail alike, so the run stops before computing."""


@dataclass
class DispatchOutcome:
    """What happened to the shards of one :func:`dispatch`.

    ``timeline`` holds one entry per time an actor was up: ``actor`` (its index in the pool),
    ``up_s`` and ``down_s`` (seconds since the pool was created), ``shards`` and ``images``
    computed, ``end`` (``released`` at the end of the run, ``preempted``, or ``lost: why``),
    and the actor's ``info()`` (node, host, pid, device, GPU ids, threads, engine).
    """

    timeline: list[dict[str, Any]] = field(default_factory=list)
    retried: dict[int, int] = field(default_factory=dict)  # shard -> failed attempts
    shard_seconds: list[float] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # summed over shards
    started_at: float = 0.0  # time.time() when the pool's actors were created
    ready_at: float = 0.0  # time.time() when the first actor was up
    images_per_s: float = 0.0  # from the first actor up to the end
    lost: dict[int, str] = field(default_factory=dict)  # shard -> why it was not stored
    stopped: str | None = None  # why the queue stopped early (a write failure), if it did


@dataclass
class _Actor:
    handle: Any
    up: bool = False
    busy: int = 0  # shards in flight
    probe: Any = None  # an info() call in flight while starting or away
    next_probe: float = 0.0
    entry: dict[str, Any] | None = None  # its timeline entry while up


def dispatch(
    actors: Sequence[Any],
    shards: Sequence[Any],
    todo: Sequence[int],
    *,
    per_actor: int,
    max_retries: int,
    startup_timeout_s: float,
    progress: Progress,
    clock: Callable[[], float] = time.monotonic,
    extra: Callable[[int], Any] | None = None,
    should_stop: Callable[[], str | None] | None = None,
) -> DispatchOutcome:
    """Process shards ``todo`` on ``actors`` (``ShardWorker`` handles, up or pending) until each
    is stored or given up.

    Each actor that is up holds up to ``per_actor`` shards. A shard whose actor died is queued
    again, up to ``max_retries`` times; then (or after ``startup_timeout_s`` without any live
    actor) it is recorded in ``lost``. A write failure reported by a worker stops the queue:
    shards in flight finish, the rest stay in ``lost``. ``extra(k)``, when given, is passed with
    shard ``k`` (the counterfactual banks). ``should_stop()``, asked before every shard is
    handed out, names a reason to stop the queue (the run lost its lock), or None.

    Raises:
        NoActorError: no actor came up within ``startup_timeout_s``.
        WorkerStartError: an actor's constructor raised.
    """
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    t0 = clock()
    pool = [_Actor(a) for a in actors]
    out = DispatchOutcome()
    queue = deque(todo)
    inflight: dict[Any, tuple[int, int]] = {}  # ref -> (actor index, shard)
    probes: dict[Any, int] = {}
    for i, a in enumerate(pool):
        a.probe = a.handle.info.remote()
        probes[a.probe] = i
    last_up, ever_up = t0, False

    def give_up(k: int, why: str) -> None:
        out.lost[k] = why

    def stop(why: str) -> None:
        out.stopped = out.stopped or why
        for k in queue:
            out.lost[k] = f"not computed: the run stopped ({why})"
        queue.clear()

    def went_away(i: int, how: str) -> None:
        a = pool[i]
        if a.entry is not None:
            a.entry.update(down_s=round(clock() - t0, 3), end=how)
        a.up, a.entry, a.next_probe = False, None, clock() + PROBE_EVERY_S

    def halted() -> bool:
        why = should_stop() if should_stop is not None else None
        if why is not None:
            stop(why)
        return why is not None

    while queue or inflight:
        halted()
        for i, a in sorted(enumerate(pool), key=lambda ia: ia[1].busy):
            while queue and a.up and a.busy < per_actor and not halted():
                k = queue.popleft()
                payload = () if extra is None else (extra(k),)
                inflight[a.handle.process.remote(k, shards[k], *payload)] = (i, k)
                a.busy += 1
            if not a.up and a.probe is None and clock() >= a.next_probe:
                a.probe = a.handle.info.remote()
                probes[a.probe] = i
        up = sum(a.up for a in pool)
        if up:
            last_up = clock()
        elif not ever_up and clock() - t0 > startup_timeout_s:
            raise NoActorError(clock() - t0)
        elif queue and clock() - last_up > startup_timeout_s:
            stop(f"no actor was up for {startup_timeout_s:.0f}s (cluster.startup_timeout_s)")
        ready, _ = ray.wait([*inflight, *probes], num_returns=1, timeout=PROBE_EVERY_S)
        for ref in ready:
            if ref in probes:
                i = probes.pop(ref)
                a = pool[i]
                a.probe = None
                try:
                    info = ray.get(ref)  # up: maybe a new pid, maybe another node
                except RayActorError as e:
                    if getattr(e, "actor_init_failed", False):
                        raise WorkerStartError(_cause(e)) from None
                    a.next_probe = clock() + PROBE_EVERY_S
                    continue
                if not ever_up:
                    out.ready_at, ever_up = time.time(), True
                    progress.restart_clock()  # the rate counts from the first actor up
                a.up = True
                a.entry = {"actor": i, "up_s": round(clock() - t0, 3), "down_s": None}
                a.entry.update(shards=0, images=0, end=None, **info)
                out.timeline.append(a.entry)
                continue
            i, k = inflight.pop(ref)
            pool[i].busy -= 1
            try:
                rep = ray.get(ref)
                out.shard_seconds.append(rep["seconds"])
                for name, secs in rep.get("phases", {}).items():
                    out.phase_seconds[name] = out.phase_seconds.get(name, 0.0) + secs
                progress.update(rep["images"], rep["error"])
                entry = pool[i].entry
                if entry is not None:
                    entry["shards"] += 1
                    entry["images"] += rep["images"]
            except RayActorError as e:
                if pool[i].up:  # no more work until it answers a probe
                    went_away(i, "preempted" if getattr(e, "preempted", False) else _lost(e))
                _retry_or_give_up(k, e, out.retried, max_retries, queue, give_up)
            except RayTaskError as e:
                if isinstance(e.cause, ShardWriteError):  # the next shards would fail alike
                    give_up(k, f"shard {k} could not be stored: {_short(e.cause)}")
                    stop(f"writing shard {k} failed: {_short(e.cause)}")
                else:
                    _retry_or_give_up(k, e, out.retried, max_retries, queue, give_up)
        progress.tick(actors_up=sum(a.up for a in pool), actors=len(pool))
    for i, a in enumerate(pool):
        if a.up:
            went_away(i, "released")
    progress.close()
    out.images_per_s = progress.rate()
    return out


def _retry_or_give_up(
    k: int,
    e: BaseException,
    retried: dict[int, int],
    max_retries: int,
    queue: deque[int],
    give_up: Callable[[int, str], None],
) -> None:
    retried[k] = retried.get(k, 0) + 1
    if retried[k] <= max_retries:
        queue.appendleft(k)
    else:
        give_up(k, f"shard {k} failed {retried[k]} times: {_short(e)}")


def _cause(e: BaseException) -> str:
    """The last line of what an actor's constructor raised (Ray wraps it in a traceback)."""
    lines = [s.strip() for s in str(e).strip().splitlines() if s.strip()]
    return lines[-1] if lines else type(e).__name__


def _lost(e: BaseException) -> str:
    return f"lost: {_short(e)[:200]}"


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    last = text[-1] if text else type(e).__name__
    return f"{type(e).__name__}: {last}"[:500]
