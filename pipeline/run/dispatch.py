"""The shard queue: hands shards to whichever actor is free and survives actors that die.

``ray.util.ActorPool`` resubmits nothing after an actor dies, so the driver does it here. An actor
whose call failed with a :class:`ray.exceptions.RayActorError` (its process died, or its node
went away) gets no work until it answers a probe again: Ray may be restarting it, or it may wait
for resources that only a new node brings. Its shard goes back to the queue for the others.

Infrastructure failures are never stored as image errors. A shard that keeps failing (actor
deaths past ``max_retries``, or no live actor for :data:`NO_ACTOR_TIMEOUT_S`) is left unstored
and named in :attr:`DispatchOutcome.lost`; a shard whose file cannot be written (a full disk, a
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

__all__ = ["DispatchOutcome", "dispatch"]

PROBE_EVERY_S = 1.0  # how often a failed actor is asked whether it is back
NO_ACTOR_TIMEOUT_S = 600.0  # give up on the remaining shards after this long with no live actor


@dataclass
class DispatchOutcome:
    """What happened to the shards of one :func:`dispatch`."""

    actors: list[dict[str, Any]]  # ShardWorker.info() of each actor when the pool started
    restarts: list[dict[str, Any]] = field(default_factory=list)  # info() after each comeback
    retried: dict[int, int] = field(default_factory=dict)  # shard -> failed attempts
    shard_seconds: list[float] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # summed over shards
    ready_at: float = 0.0  # time.time() when every actor had started
    images_per_s: float = 0.0
    lost: dict[int, str] = field(default_factory=dict)  # shard -> why it was not stored
    stopped: str | None = None  # why the queue stopped early (a write failure), if it did


@dataclass
class _Actor:
    handle: Any
    busy: int = 0  # shards in flight
    up: bool = True
    probe: Any = None  # an info() call in flight while down
    next_probe: float = 0.0


def dispatch(
    actors: Sequence[Any],
    shards: Sequence[Any],
    todo: Sequence[int],
    *,
    per_actor: int,
    max_retries: int,
    progress: Progress,
    info: Sequence[dict[str, Any]],
    clock: Callable[[], float] = time.monotonic,
    extra: Callable[[int], Any] | None = None,
) -> DispatchOutcome:
    """Process shards ``todo`` on ``actors`` (``ShardWorker`` handles) until each is stored or
    given up.

    Each actor holds up to ``per_actor`` shards. A shard whose actor died is queued again, up to
    ``max_retries`` times; then (or after ``NO_ACTOR_TIMEOUT_S`` without any live actor) it is
    recorded in ``lost``. A write failure reported by a worker stops the queue: shards in flight
    finish, the rest stay in ``lost``. ``extra(k)``, when given, is passed with shard ``k``
    (the counterfactual banks).
    """
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    pool = [_Actor(a) for a in actors]
    out = DispatchOutcome(actors=list(info))
    queue = deque(todo)
    inflight: dict[Any, tuple[int, int]] = {}  # ref -> (actor index, shard)
    probes: dict[Any, int] = {}
    last_up = clock()

    def give_up(k: int, why: str) -> None:
        out.lost[k] = why

    def stop(why: str) -> None:
        out.stopped = out.stopped or why
        for k in queue:
            out.lost[k] = f"not computed: the run stopped ({why})"
        queue.clear()

    while queue or inflight:
        for i, a in sorted(enumerate(pool), key=lambda ia: ia[1].busy):
            while queue and a.up and a.busy < per_actor:
                k = queue.popleft()
                payload = () if extra is None else (extra(k),)
                inflight[a.handle.process.remote(k, shards[k], *payload)] = (i, k)
                a.busy += 1
            if not a.up and a.probe is None and clock() >= a.next_probe:
                a.probe = a.handle.info.remote()
                probes[a.probe] = i
        if any(a.up for a in pool):
            last_up = clock()
        elif queue and clock() - last_up > NO_ACTOR_TIMEOUT_S:
            stop(f"no actor could be placed for {NO_ACTOR_TIMEOUT_S:.0f}s")
        ready, _ = ray.wait([*inflight, *probes], num_returns=1, timeout=PROBE_EVERY_S)
        for ref in ready:
            if ref in probes:
                a = pool[probes.pop(ref)]
                a.probe = None
                try:
                    back = ray.get(ref)  # restarted: maybe a new pid, maybe another node
                    out.restarts.append({"actor": pool.index(a), **back})
                    a.up = True
                except RayActorError:
                    a.next_probe = clock() + PROBE_EVERY_S
                continue
            i, k = inflight.pop(ref)
            pool[i].busy -= 1
            try:
                rep = ray.get(ref)
                out.shard_seconds.append(rep["seconds"])
                for name, secs in rep.get("phases", {}).items():
                    out.phase_seconds[name] = out.phase_seconds.get(name, 0.0) + secs
                progress.update(rep["images"], rep["error"])
            except RayActorError as e:
                pool[i].up = False  # no more work until it answers a probe
                _retry_or_give_up(k, e, out.retried, max_retries, queue, give_up)
            except RayTaskError as e:
                if isinstance(e.cause, ShardWriteError):  # the next shards would fail alike
                    give_up(k, f"shard {k} could not be stored: {_short(e.cause)}")
                    stop(f"writing shard {k} failed: {_short(e.cause)}")
                else:
                    _retry_or_give_up(k, e, out.retried, max_retries, queue, give_up)
        progress.tick()
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


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    last = text[-1] if text else type(e).__name__
    return f"{type(e).__name__}: {last}"[:500]
