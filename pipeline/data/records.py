"""The unit of work: one image as a worker reads it, whatever format it came from.

A source (:mod:`pipeline.data.source`) turns its rows, annotations or tar members into
``ImageRecord``s; the workers decode them with :func:`pipeline.data.foreground.load_item`. Where
the foreground comes from is one of four small specs: a mask image (a file or bytes), boxes, or
COCO segments. A static mask or region configured for the whole dataset needs no spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Boxes",
    "CocoSegments",
    "Foreground",
    "ImageRecord",
    "MaskBytes",
    "MaskFile",
    "fg_from_text",
]

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in original-image pixels, x1/y1 exclusive


@dataclass(frozen=True)
class MaskFile:
    """A mask image file, relative to ``dataset.root`` (or a URI under it)."""

    path: str

    def describe(self) -> str:
        return self.path


@dataclass(frozen=True)
class MaskBytes:
    """An encoded mask image held in the record (a Parquet Image column, a tar member)."""

    data: bytes = field(repr=False)
    name: str  # where it came from, for messages and the stored ``mask`` column

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class Boxes:
    """One or more boxes; the foreground is their union. No box at all is an empty mask."""

    boxes: tuple[Box, ...]

    def describe(self) -> str:
        return "box:" + ";".join(",".join(f"{v:g}" for v in b) for b in self.boxes)


@dataclass(frozen=True)
class CocoSegments:
    """COCO instance annotations of one image; the foreground is the union of their masks.

    ``segments`` holds each annotation's ``segmentation`` (polygons, uncompressed or compressed
    RLE) or, when it has none, ``None`` with its ``bbox`` (x, y, width, height) in ``bboxes``.
    """

    segments: tuple[Any, ...]
    bboxes: tuple[tuple[float, float, float, float], ...]
    height: int  # the image's size as the JSON states it
    width: int
    name: str  # "coco:<image id>", for messages and the stored ``mask`` column

    def describe(self) -> str:
        return self.name


Foreground = MaskFile | MaskBytes | Boxes | CocoSegments


@dataclass(frozen=True)
class ImageRecord:
    """One image as a worker needs it.

    Attributes:
        image_id: unique key, stored with every result row.
        path: where the image is: a path relative to ``dataset.root`` (or a URI), or, for bytes
            held in the record, a locator such as ``val.parquet#12`` or ``shard-0.tar#key.jpg``
            that :meth:`pipeline.data.source.Source.fetch` reads again.
        groups: group column -> value (``None`` where null), in ``group_by`` order.
        label: ground-truth label as text, or ``None``.
        data: the encoded image, when the source holds it (Parquet, tar); None: read ``path``.
        fg: where the foreground comes from, or None (the static mask, if configured, or none).
        error: what the source found wrong with this item (an unknown category, no image
            bytes); the worker stores it as the item's error row instead of decoding it.
    """

    image_id: str
    path: str
    groups: dict[str, str | None] = field(default_factory=dict, hash=False)
    label: str | None = None
    data: bytes | None = field(default=None, repr=False)
    fg: Foreground | None = None
    error: str | None = None

    @property
    def mask(self) -> str | None:
        """The mask as stored in the maps' ``mask`` column: a path, locator or box list."""
        return None if self.fg is None else self.fg.describe()


def fg_from_text(text: str | None) -> Foreground | None:
    """The foreground spec a stored ``mask`` text names: ``box:x0,y0,x1,y1;...`` boxes, or a
    mask file path. (Locators of masks held in a source are read back by the source.)"""
    if not text:
        return None
    if text.startswith("box:"):
        boxes = [tuple(float(v) for v in part.split(",")) for part in text[4:].split(";") if part]
        return Boxes(tuple(boxes))  # type: ignore[arg-type]
    return MaskFile(text)
