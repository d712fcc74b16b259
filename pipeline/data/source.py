"""A source of images: what every format (table, huggingface, coco, webdataset, imagefolder)
offers the driver and the workers.

The driver never holds one Python object per image. It asks a source for its shards (row
ranges, or parts of tar shards) and makes one streaming pass over a few light columns
(:data:`LIGHT`) to check ids, count groups and fingerprint the data
(:func:`pipeline.data.plan.plan_source`). Each worker opens the same source and reads only its
own shards' rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa

from pipeline.config.dataset import DatasetConfig
from pipeline.data.records import ImageRecord

__all__ = ["LIGHT", "ShardRef", "Source", "SourceError", "light_schema"]

#: Columns of every light batch besides the group columns: the id, the label as text, whether
#: the image has a foreground of its own, and a fingerprint text of the row (path, mask, box).
LIGHT = ("image_id", "label", "has_fg", "what")


class SourceError(ValueError):
    """The source cannot be read or breaks its contract (missing columns, null or duplicate
    ids, an unknown category); raised before any compute, the CLI exits 2."""


def light_schema(group_by: Sequence[str]) -> pa.Schema:
    """Schema of a light batch: ``image_id``, the group columns, ``label``, ``has_fg``, ``what``."""
    fields = [pa.field("image_id", pa.string())]
    fields += [pa.field(f"group:{g}", pa.string()) for g in group_by]
    fields += [
        pa.field("label", pa.string()),
        pa.field("has_fg", pa.bool_()),
        pa.field("what", pa.string()),
    ]
    return pa.schema(fields)


@dataclass(frozen=True)
class ShardRef:
    """Rows ``[start, stop)`` of a source, counted across all its files in order.

    ``part`` names the file the rows lie in when a source's shards never cross files (a tar
    shard), and ``offset`` is that file's first row.
    """

    index: int
    start: int
    stop: int
    part: str | None = None
    offset: int = 0

    def __len__(self) -> int:
        return self.stop - self.start


class Source:
    """Base of the formats. Subclasses set ``found`` and implement the methods; ``format`` is
    set by :func:`pipeline.data.detect.open_source` from the registry.

    Args:
        cfg: the dataset section; its ``format`` is the subclass's.
    """

    format: str = ""
    found: str = ""  # what was opened, in words ("3 Parquet files, 1200 rows, Image column 'img'")
    detected: str = ""  # why this format (set by open_source)

    def __init__(self, cfg: DatasetConfig) -> None:
        self.cfg = cfg

    @property
    def num_rows(self) -> int:
        """Images in the source."""
        raise NotImplementedError

    def shards(self, size: int) -> list[ShardRef]:
        """The run's shards: consecutive row ranges of at most ``size`` rows."""
        out, n = [], self.num_rows
        for k, start in enumerate(range(0, n, size)):
            out.append(ShardRef(k, start, min(start + size, n)))
        return out

    def light(self, rows: int = 65536) -> Iterator[pa.Table]:
        """Every row's light columns (:func:`light_schema`), in row order, in batches."""
        raise NotImplementedError

    def read(self, ref: ShardRef) -> list[ImageRecord]:
        """The records of one shard, in row order (a worker's call)."""
        raise NotImplementedError

    def take(self, rows: Sequence[int]) -> list[ImageRecord]:
        """The records of the given rows, in that order (the counterfactual banks)."""
        raise NotImplementedError

    def fetch(self, image_id: str, locator: str, mask: str | None) -> ImageRecord:
        """One stored image's record again, from the ``path`` and ``mask`` a maps row holds
        (the report draws it)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Text that changes when the source's bytes may have changed beyond its light columns
        (file sizes); part of the run's identity."""
        return ""

    def class_names(self) -> dict[str, str]:
        """The name of each class, keyed by the stored ``label`` text, where the format knows
        them (a ``ClassLabel`` label column, COCO categories, class folders); else empty. The
        run records them in ``run.json`` (``class_names``), so a report grouped by ``label``
        shows "red fox", not "277"."""
        return {}
