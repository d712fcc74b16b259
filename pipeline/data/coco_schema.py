"""The structure of a COCO instances JSON, checked once as it is parsed (:mod:`~.coco`).

What passes is what the reader relies on: ``images``, ``annotations`` and ``categories`` are
lists of objects; ids are integers or text; an image's ``width`` and ``height`` are whole pixels;
``bbox``, ``area`` and polygon coordinates are finite numbers; a segmentation is polygons or RLE.
Anything else is one :class:`~pipeline.data.source.SourceError` naming the file, the entry and
field (``annotations[3].bbox``), the value as JSON and what it must be, raised before any compute,
never a ``TypeError`` or ``OverflowError`` deep inside the reader. The format:
https://cocodataset.org/#format-data.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pipeline.data.source import SourceError

__all__ = ["check_coco"]

# pycocotools keeps an image's height and width in 32-bit integers
_MAX_SIDE = 2**31 - 1
_SHOWN = 60  # characters of an offending value quoted in a message


def check_coco(data: dict[str, Any], path: str) -> None:
    """Check the parts of a parsed COCO JSON (a dict with ``images`` and ``annotations``).

    Args:
        data: the parsed JSON.
        path: the file, for messages.

    Raises:
        SourceError: the first entry that breaks the structure, e.g. ``c.json: annotations[3]
            is 7; each entry of annotations must be an object``.
    """
    for part in ("images", "annotations", "categories"):
        if part == "categories" and data.get(part) is None:
            continue  # optional: no categories, every category_id is unknown
        if not isinstance(data[part], list):
            _fail(path, part, data[part], "it must be a list of objects")
        for k, entry in enumerate(data[part]):
            where = f"{part}[{k}]"
            if not isinstance(entry, dict):
                _fail(path, where, entry, f"each entry of {part} must be an object")
            _CHECKS[part](entry, path, where)


def _image(im: dict[str, Any], path: str, where: str) -> None:
    _id(im.get("id"), path, f"{where}.id")
    for side in ("width", "height"):
        v = im.get(side)
        if v is not None and not (_is_number(v) and float(v).is_integer() and 1 <= v <= _MAX_SIDE):
            _fail(
                path, f"{where}.{side}", v, f"it must be a whole number of pixels, 1 to {_MAX_SIDE}"
            )
    name = im.get("file_name")
    if name is not None and not isinstance(name, str):
        _fail(path, f"{where}.file_name", name, "it must be text, a path under dataset.root")


def _annotation(a: dict[str, Any], path: str, where: str) -> None:
    if a.get("id") is not None:
        _id(a["id"], path, f"{where}.id")
    _id(a.get("image_id"), path, f"{where}.image_id")
    _id(a.get("category_id"), path, f"{where}.category_id")
    area = a.get("area")
    if area is not None and not (_is_number(area) and area >= 0):
        _fail(path, f"{where}.area", area, "it must be a finite number >= 0 (pixels)")
    bbox = a.get("bbox")
    if bbox is not None and not (
        isinstance(bbox, list)
        and len(bbox) == 4
        and all(_is_number(v) for v in bbox)
        and bbox[2] >= 0
        and bbox[3] >= 0
    ):
        _fail(path, f"{where}.bbox", bbox, "it must be [x, y, width, height], finite, sizes >= 0")
    _segmentation(a.get("segmentation"), path, f"{where}.segmentation")


def _segmentation(seg: Any, path: str, where: str) -> None:
    """Polygons (lists of finite coordinates), one RLE object, or a list of RLE objects."""
    parts = seg if isinstance(seg, list) else [] if seg is None else [seg]
    for k, part in enumerate(parts):
        at = f"{where}[{k}]" if isinstance(seg, list) else where
        if isinstance(part, dict):
            size, counts = part.get("size"), part.get("counts")
            if not (
                isinstance(size, list)
                and len(size) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in size)
            ):
                _fail(path, f"{at}.size", size, "an RLE's size must be [height, width]")
            if not (
                isinstance(counts, str)
                or (isinstance(counts, list) and all(_is_count(v) for v in counts))
            ):
                _fail(path, f"{at}.counts", counts, "RLE counts must be text or whole numbers")
        elif not (isinstance(part, list) and all(_is_number(v) for v in part)):
            _fail(path, at, part, "a polygon must be a list of finite x, y coordinates")


def _category(c: dict[str, Any], path: str, where: str) -> None:
    _id(c.get("id"), path, f"{where}.id")
    for key in ("name", "supercategory"):
        if c.get(key) is not None and not isinstance(c[key], str):
            _fail(path, f"{where}.{key}", c[key], "it must be text")


_CHECKS = {"images": _image, "annotations": _annotation, "categories": _category}


def _id(value: Any, path: str, where: str) -> None:
    ok = isinstance(value, str) and value != ""
    ok = ok or (isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        _fail(path, where, value, "an id must be an integer or non-empty text")


def _is_number(value: Any) -> bool:
    """A finite JSON number that converts to a float: ``true``/``false`` are no numbers, ``1e400``
    parses as infinity and a 400-digit integer overflows a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond the float range
        return False


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _fail(path: str, where: str, value: Any, must: str) -> None:
    shown = json.dumps(value, default=str)
    if len(shown) > _SHOWN:
        shown = shown[: _SHOWN - 3] + "..."
    raise SourceError(f"{path}: {where} is {shown}; {must}")
