"""Which audit wrote each shard: the identity digest every shard records, and the check that
a folder holds one audit only (docs/design.md, "Run folder", a lost lease)."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow.parquet as pq

from pipeline.run.folder import IDENTITY_KEY, RunFolder, RunFolderError
from pipeline.run.record import RunRecord, identity_digest

__all__ = ["check_one_audit", "foreign_shards", "shard_identities"]


def shard_identities(
    folder: RunFolder, names: Sequence[str] | None = None
) -> dict[str, str | None]:
    """The identity digest each stored shard was written with (None: written before shards
    carried one), from the Parquet footers."""
    out: dict[str, str | None] = {}
    for name in folder.shard_names() if names is None else names:
        with folder.store.open(name) as f:
            meta = pq.ParquetFile(f).schema_arrow.metadata or {}
        value = meta.get(IDENTITY_KEY)
        out[name] = None if value is None else value.decode()
    return out


def foreign_shards(folder: RunFolder, digest: str, names: Sequence[str] | None = None) -> list[str]:
    """Stored shards written by a run with another identity than ``digest``."""
    found = shard_identities(folder, names)
    return [n for n, d in found.items() if d is not None and d != digest]


def check_one_audit(folder: RunFolder, record: RunRecord | None) -> None:
    """Refuse a folder whose shards were not all written with its run's settings: two audits
    mixed in one folder (a run that lost its lock kept writing).

    Raises:
        RunFolderError: naming the foreign shards.
    """
    if record is None or not record.identity:
        return
    foreign = foreign_shards(folder, identity_digest(record.identity))
    if foreign:
        more = ", ..." if len(foreign) > 5 else ""
        raise RunFolderError(
            f"{len(foreign)} shard(s) of {folder.path} were written with other settings than "
            f"its run.json ({', '.join(foreign[:5])}{more}): the folder mixes two audits; "
            "`occlusion-audit run --resume` recomputes them"
        )
