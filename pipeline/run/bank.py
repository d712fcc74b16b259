"""Which backgrounds each image is pasted onto: per-group banks and per-image draws.

Planned in the driver from its one streaming pass over the source, so a draw never depends on
sharding, batching or actors. A group's bank is its ``counterfactual.bank`` images with a
foreground that rank first by ``sha256(seed, image_id)``. An image draws ``swaps`` bank images
of its own group (never itself) and ``swaps`` of the other groups, with a generator seeded by
``(seed, image_id)``. The banks travel to every worker once; a worker draws for its shard's
images and decodes just the bank images those draws use.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config import AuditConfig

__all__ = ["BankPlanner", "Banks", "Draws", "ShardEvidence"]

GroupKey = tuple[str | None, ...]


def _rank(seed: int, image_id: str) -> bytes:
    return hashlib.sha256(f"{int(seed)}\x00bank\x00{image_id}".encode()).digest()


def _rng(seed: int, image_id: str) -> random.Random:
    digest = hashlib.sha256(f"{int(seed)}\x00draw\x00{image_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def group_key(record: Any, group_by: Sequence[str]) -> GroupKey:
    groups = dict(record.groups)
    return tuple(None if groups.get(g) is None else str(groups[g]) for g in group_by)


@dataclass(frozen=True)
class Draws:
    """The bank image ids one image is pasted onto."""

    same: tuple[str, ...]  # of its own group
    rand: tuple[str, ...]  # of other groups


@dataclass(frozen=True)
class ShardEvidence:
    """What a worker needs for one shard's counterfactuals."""

    draws: dict[str, Draws]  # image_id -> draws (images with a foreground only)
    bank: list[Any]  # the records of every bank image those draws use


class Banks:
    """The per-group banks of one run and the draws of its images.

    Args:
        banks: group key -> its bank records, best rank first.
        cfg: the run's config.
    """

    def __init__(self, banks: dict[GroupKey, list[Any]], cfg: AuditConfig) -> None:
        self.cfg = cfg.counterfactual
        self.group_by = tuple(cfg.dataset.group_by)
        self.static = cfg.dataset.static
        self.banks = dict(sorted(banks.items(), key=lambda kv: [str(v) for v in kv[0]]))
        # one flat list, group by group: another group's bank is everything outside a range
        self.flat = [r for rs in self.banks.values() for r in rs]
        self.span: dict[GroupKey, tuple[int, int]] = {}
        start = 0
        for key, rs in self.banks.items():
            self.span[key] = (start, start + len(rs))
            start += len(rs)

    def has_fg(self, record: Any) -> bool:
        return record.fg is not None or self.static

    def draw(self, record: Any) -> Draws:
        """The draws of one image (deterministic in ``(seed, image_id)`` and the banks)."""
        key = group_key(record, self.group_by)
        rng = _rng(self.cfg.seed, record.image_id)
        own = [r.image_id for r in self.banks.get(key, []) if r.image_id != record.image_id]
        same = tuple(_pick(rng, own, self.cfg.swaps))
        lo, hi = self.span.get(key, (0, 0))
        n_other = len(self.flat) - (hi - lo)
        picks = _pick(rng, list(range(n_other)), self.cfg.swaps)
        rand = tuple(self.flat[i if i < lo else i + (hi - lo)].image_id for i in picks)
        return Draws(same, rand)

    def for_shard(self, records: Sequence[Any]) -> ShardEvidence:
        """The draws of a shard's images with a foreground, and the bank records they use."""
        draws = {r.image_id: self.draw(r) for r in records if self.has_fg(r) and r.error is None}
        needed = {i for d in draws.values() for i in (*d.same, *d.rand)}
        return ShardEvidence(draws, [r for r in self.flat if r.image_id in needed])


def _pick(rng: random.Random, pool: list[Any], k: int) -> list[Any]:
    """``k`` distinct items of ``pool`` when it has enough, else ``k`` with repetition."""
    if not pool:
        return []
    return rng.sample(pool, k) if len(pool) >= k else rng.choices(pool, k=k)


class BankPlanner:
    """Builds the banks from the driver's streaming pass: per group, the ``bank`` rows with a
    foreground that rank first, kept in a heap (memory: groups x bank)."""

    def __init__(self, cfg: AuditConfig) -> None:
        self.cfg = cfg
        self.size = int(cfg.counterfactual.bank)
        self.seed = cfg.counterfactual.seed
        self.static = cfg.dataset.static
        self.heaps: dict[GroupKey, list[tuple[bytes, int]]] = {}

    def add(self, first: int, batch: Any) -> None:
        """One light batch (``pipeline.data.source.light_schema``) whose first row is ``first``."""
        cols = [batch.column(f"group:{g}").to_pylist() for g in self.cfg.dataset.group_by]
        has = batch.column("has_fg").to_pylist()
        for j, image_id in enumerate(batch.column("image_id").to_pylist()):
            if not (has[j] or self.static):
                continue
            key = tuple(None if c[j] is None else str(c[j]) for c in cols)
            heap = self.heaps.setdefault(key, [])
            # a max-heap of the best `size` ranks: negated so that heap[0] is the worst kept
            item = (bytes(255 - b for b in _rank(self.seed, image_id)), -(first + j))
            if len(heap) < self.size:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)

    def finish(self, source: Any) -> Banks:
        """The banks, with their records read from ``source``."""
        rows = {
            key: [-row for _, row in sorted(heap, reverse=True)] for key, heap in self.heaps.items()
        }
        flat = [r for rs in rows.values() for r in rs]
        records = dict(zip(flat, source.take(flat), strict=True)) if flat else {}
        banks = {
            key: [records[r] for r in rs if records[r].error is None] for key, rs in rows.items()
        }
        return Banks(banks, self.cfg)
