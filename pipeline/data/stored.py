"""Reading a stored maps row's image and foreground again, from whatever source it came from
(the report draws them). Paths and boxes are read directly; images held inside a source (a
Parquet Image column, a tar member, COCO segments) are fetched from it by their locator."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from pipeline.config.dataset import DataFormat, DatasetConfig
from pipeline.data.foreground import Item, load_item
from pipeline.data.records import ImageRecord, fg_from_text
from pipeline.data.source import Source

__all__ = ["StoredImages"]

# A run records the format it found; ``auto`` is left only in records of runs made before
# there were other formats, whose rows hold paths.
_PATH_FORMATS = (DataFormat.AUTO, DataFormat.TABLE, DataFormat.IMAGEFOLDER)


class StoredImages:
    """Loads stored rows' images and foregrounds for one run's dataset.

    Args:
        dataset: the run's dataset section (``run.json``), or just a root folder or URI for
            rows whose ``path`` and ``mask`` are files and boxes.
    """

    def __init__(self, dataset: DatasetConfig | str | None) -> None:
        if not isinstance(dataset, DatasetConfig):
            dataset = DatasetConfig(manifest="", root=dataset, format=DataFormat.TABLE)
        self.dataset = dataset
        self._source: Source | None = None

    def record(self, row: Mapping[str, Any]) -> ImageRecord:
        image_id, path, mask = str(row["image_id"]), str(row["path"]), row.get("mask")
        if self.dataset.format in _PATH_FORMATS:
            return ImageRecord(image_id=image_id, path=path, fg=fg_from_text(mask))
        if self._source is None:
            from pipeline.data.detect import open_source

            self._source = open_source(self.dataset)
        return self._source.fetch(image_id, path, mask)

    def load(self, row: Mapping[str, Any]) -> Item:
        """The row's image at its stored size (``image_h``/``image_w``) and its foreground.

        Raises:
            DataError, SourceError, OSError: as for a worker's read of the same item.
        """
        size = (int(row["image_h"]), int(row["image_w"]))
        dataset = self.dataset
        if tuple(dataset.image_size) != size:
            dataset = replace(dataset, image_size=size)
        return load_item(self.record(row), dataset)
