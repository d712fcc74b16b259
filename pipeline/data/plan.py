"""The driver's one streaming pass over a source: ids checked, groups counted, data fingerprinted.

Memory is bounded by one batch of light columns plus 8 bytes per image (a 64-bit hash of each
id, kept to check the stored maps against the source, exactly once, at the end of a run). No
Python object per image outlives its batch.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.source import ShardRef, Source, SourceError

__all__ = ["SourcePlan", "check_stored_ids", "hash_ids", "plan_source"]

_SHOW = 5  # offending values quoted in a message


def hash_ids(ids: pa.Array | pa.ChunkedArray | Iterable[str]) -> np.ndarray:
    """A stable 64-bit hash per id (``uint64``), the same across processes and runs."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    values = (
        ids.to_numpy(zero_copy_only=False)
        if isinstance(ids, pa.Array)
        else np.asarray(list(ids), dtype=object)
    )
    return pd.util.hash_array(values.astype(object), categorize=False)


@dataclass(frozen=True)
class SourcePlan:
    """What the driver knows of a source after one pass."""

    format: str
    found: str  # what was opened, in words
    detected: str  # why this format
    images: int
    shards: list[ShardRef]
    digest: str  # SHA-256 of the light columns and the source's fingerprint
    groups: dict[tuple[str | None, ...], int] = field(default_factory=dict)  # rows per group
    with_fg: int = 0  # images with a foreground (their own, or the static one)
    id_hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64), repr=False)


def plan_source(
    source: Source,
    shard_size: int,
    on_batch: Callable[[int, pa.Table], None] | None = None,
) -> SourcePlan:
    """Stream the source's light columns once.

    Args:
        source: an opened source.
        shard_size: rows per shard (a tar shard's samples are split likewise).
        on_batch: called with ``(first row, light batch)`` for each batch (the counterfactual
            banks are planned from the same pass).

    Raises:
        SourceError: null or empty ids, duplicate ids (the first few are named), no rows.
    """
    digest = hashlib.sha256(source.fingerprint().encode())
    hashes: list[np.ndarray] = []
    groups: Counter = Counter()
    with_fg, first = 0, 0
    group_cols = [f"group:{g}" for g in source.cfg.group_by]
    static = source.cfg.static
    for batch in source.light():
        ids = batch.column("image_id")
        bad = pc.indices_nonzero(pc.or_kleene(pc.is_null(ids), pc.equal(ids, ""))).to_pylist()
        if bad:
            raise SourceError(
                f"{source.cfg.manifest}: the image id is null or empty in {len(bad)} row(s), "
                f"first rows (0-based): {[first + b for b in bad[:_SHOW]]}"
            )
        for name in batch.column_names:
            col = batch.column(name)
            text = col if col.type == pa.string() else pc.cast(col, pa.string())
            digest.update(hash_ids(pc.fill_null(text, "\x00null")).tobytes())
        hashes.append(hash_ids(ids))
        if group_cols:
            keys = zip(*(batch.column(c).to_pylist() for c in group_cols), strict=True)
            groups.update(keys)
        else:
            groups[()] += batch.num_rows
        with_fg += batch.num_rows if static else int(pc.sum(batch.column("has_fg")).as_py() or 0)
        if on_batch is not None:
            on_batch(first, batch)
        first += batch.num_rows
    if first == 0:
        raise SourceError(f"{source.cfg.manifest} has no images")
    all_hashes = np.sort(np.concatenate(hashes)) if hashes else np.zeros(0, np.uint64)
    _check_unique(source, all_hashes)
    return SourcePlan(
        format=str(source.format),
        found=source.found,
        detected=getattr(source, "detected", ""),
        images=first,
        shards=source.shards(shard_size),
        digest=digest.hexdigest(),
        groups=dict(groups),
        with_fg=with_fg,
        id_hashes=all_hashes,
    )


def _check_unique(source: Source, sorted_hashes: np.ndarray) -> None:
    same = sorted_hashes[1:] == sorted_hashes[:-1]
    if not same.any():
        return
    # equal hashes: look up the ids behind them (a second pass, only when something is wrong)
    suspects = set(sorted_hashes[1:][same].tolist())
    seen: Counter = Counter()
    for batch in source.light():
        ids = batch.column("image_id")
        hit = np.isin(hash_ids(ids), list(suspects))
        seen.update(ids.filter(pa.array(hit)).to_pylist())
    dups = sorted(i for i, n in seen.items() if n > 1)
    if dups:
        raise SourceError(
            f"{source.cfg.manifest}: {len(dups)} duplicate image id(s), first: {dups[:_SHOW]}; "
            "ids must be unique"
        )


def check_stored_ids(
    stored: pa.Array | pa.ChunkedArray | Iterable[str] | np.ndarray,
    plan: SourcePlan,
    load_ids: Callable[[], list[str]] | None = None,
) -> None:
    """Check that the stored image ids are the source's, each exactly once.

    Compares sorted 64-bit id hashes, so memory is 8 bytes per image; the ids are named when
    they differ.

    Args:
        stored: the stored ids, or their hashes (:func:`hash_ids`, ``uint64``).
        plan: the source's plan.
        load_ids: gives the stored ids as text when ``stored`` holds hashes (called only when
            they differ, to name them).

    Raises:
        RuntimeError: naming duplicated, missing and unexpected ids.
    """
    is_hashes = isinstance(stored, np.ndarray) and stored.dtype == np.uint64
    got = np.sort(stored if is_hashes else hash_ids(stored))
    if len(got) == len(plan.id_hashes) and np.array_equal(got, plan.id_hashes):
        return
    if is_hashes:
        stored_list = load_ids() if load_ids is not None else []
    else:
        stored_list = stored.to_pylist() if hasattr(stored, "to_pylist") else list(stored)
    dup = sorted({i for i, n in Counter(stored_list).items() if n > 1})
    want = set(plan.id_hashes.tolist())
    have = set(got.tolist())
    hashed = hash_ids(stored_list).tolist() if stored_list else []
    extra = [i for i, h in zip(stored_list, hashed, strict=True) if h not in want]
    missing = len(want - have)
    raise RuntimeError(
        f"stored maps do not match the source: {missing} missing, {len(extra)} unexpected "
        f"{extra[:_SHOW]}, {len(dup)} duplicated {dup[:_SHOW]}"
    )
