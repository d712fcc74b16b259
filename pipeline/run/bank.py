"""Which backgrounds each image is pasted onto: per-group banks and per-image draws.

Planned in the driver from the whole manifest, so a draw never depends on sharding, batching or
actors. A group's bank is its ``counterfactual.bank`` images with a foreground (a mask or a
box) that rank first by ``sha256(seed, image_id)``. An image draws ``swaps`` bank images of its
own group (never itself) and ``swaps`` of the other groups, with a generator seeded by
``(seed, image_id)``. A shard's job carries the draws of its images and the records of just the
bank images they use, so a worker decodes only those.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config import AuditConfig

__all__ = ["Banks", "Draws", "ShardEvidence", "plan_banks"]

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
    """The per-group banks of one run and the draws of its images."""

    def __init__(self, records: Sequence[Any], cfg: AuditConfig) -> None:
        self.cfg = cfg.counterfactual
        self.group_by = tuple(cfg.dataset.group_by)
        by_group: dict[GroupKey, list[Any]] = {}
        for r in records:
            if r.mask is not None or r.box is not None:
                by_group.setdefault(group_key(r, self.group_by), []).append(r)
        self.banks = {
            key: sorted(rs, key=lambda r: _rank(self.cfg.seed, r.image_id))[: self.cfg.bank]
            for key, rs in sorted(by_group.items(), key=lambda kv: [str(v) for v in kv[0]])
        }
        # one flat list, group by group: another group's bank is everything outside a range
        self.flat = [r for rs in self.banks.values() for r in rs]
        self.span: dict[GroupKey, tuple[int, int]] = {}
        start = 0
        for key, rs in self.banks.items():
            self.span[key] = (start, start + len(rs))
            start += len(rs)

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
        draws = {
            r.image_id: self.draw(r) for r in records if r.mask is not None or r.box is not None
        }
        needed = {i for d in draws.values() for i in (*d.same, *d.rand)}
        return ShardEvidence(draws, [r for r in self.flat if r.image_id in needed])


def _pick(rng: random.Random, pool: list[Any], k: int) -> list[Any]:
    """``k`` distinct items of ``pool`` when it has enough, else ``k`` with repetition."""
    if not pool:
        return []
    return rng.sample(pool, k) if len(pool) >= k else rng.choices(pool, k=k)


def plan_banks(records: Sequence[Any], cfg: AuditConfig) -> Banks | None:
    """The run's banks, or None when counterfactuals are off."""
    return Banks(records, cfg) if cfg.counterfactual.enabled else None
