"""Foregrounds on the resized grid, from every kind of source: masks, class ids, boxes, COCO
segments, or one static mask or region for the whole dataset.

Every function returns ``(fg, ignore)``: ``(H, W)`` bool tensors on the resized image's grid.
``ignore`` marks pixels that count as neither foreground nor background (VOC's 255 border), or is
None. A mask is resized with the nearest-neighbour rule, so class ids are never blended.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from pipeline.config.dataset import DatasetConfig
from pipeline.data.images import (
    DataError,
    binary_foreground,
    box_mask,
    decode_bytes,
    decode_image,
    load_image,
    read_file,
)
from pipeline.data.records import Boxes, CocoSegments, ImageRecord, MaskBytes, MaskFile

__all__ = ["Item", "load_item", "record_foreground", "static_foreground"]

Mask = tuple[torch.Tensor, torch.Tensor | None]  # (fg, ignore), each (H, W) bool
_SHOW = 8  # mask values quoted in a message


def _nearest(arr: np.ndarray, size: Sequence[int]) -> torch.Tensor:
    """``(h, w)`` bool -> ``(H, W)`` bool, nearest neighbour."""
    img = Image.fromarray(arr.astype(np.uint8) * 255)
    if img.size != (int(size[1]), int(size[0])):
        img = img.resize((int(size[1]), int(size[0])), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(img) > 127)


def _values(img: Image.Image, label: str) -> np.ndarray:
    """Class ids of a single-channel or palette mask (palette indices, not colours)."""
    if img.mode not in ("P", "L", "I", "I;16", "I;16L", "I;16B", "1"):
        raise DataError(
            f"{label}: dataset.foreground_values needs a single-channel or palette mask, "
            f"this one is {img.mode}"
        )
    return np.asarray(img).astype(np.int64)


def _mask_arrays(img: Image.Image, ds: DatasetConfig, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Original-size ``(fg, ignore)`` arrays of a decoded mask image."""
    if ds.foreground_values is None:
        fg = binary_foreground(img)
        if ds.ignore_value is None or fg.ndim != 2 or img.mode not in ("P", "L", "I", "I;16"):
            return fg, np.zeros_like(fg)
        ignore = np.asarray(img).astype(np.int64) == ds.ignore_value
        return fg & ~ignore, ignore
    values = _values(img, label)
    fg = np.isin(values, np.asarray(ds.foreground_values))
    if not fg.any():
        present = np.unique(values)[:_SHOW].tolist()
        raise DataError(
            f"{label}: the mask's values {present} include none of dataset.foreground_values "
            f"{list(ds.foreground_values)}"
        )
    if ds.ignore_value is None:
        return fg, np.zeros_like(fg)
    return fg, values == ds.ignore_value


def _from_mask_bytes(
    data: bytes, where: str, label: str, ds: DatasetConfig, orig: tuple[int, int]
) -> Mask:
    img = decode_bytes(data, where, "mask", label, ds.max_pixels)
    if img.size != (orig[1], orig[0]):
        raise DataError(
            f"{label}: mask {img.size[0]}x{img.size[1]} does not match image "
            f"{orig[1]}x{orig[0]} (width x height)"
        )
    fg, ignore = _mask_arrays(img, ds, label)
    return _nearest(fg, ds.image_size), (_nearest(ignore, ds.image_size) if ignore.any() else None)


def _from_boxes(boxes: Boxes, orig: tuple[int, int], size: Sequence[int], label: str) -> Mask:
    out = torch.zeros(int(size[0]), int(size[1]), dtype=torch.bool)
    for b in boxes.boxes:
        out |= box_mask(b, orig, (int(size[0]), int(size[1])), label)
    return out, None


def _from_coco(seg: CocoSegments, orig: tuple[int, int], size: Sequence[int], label: str) -> Mask:
    try:
        from pycocotools import mask as coco_mask
    except ImportError as e:  # pragma: no cover - depends on the installed extras
        raise ImportError(
            "COCO segmentations need pycocotools: pip install 'occlusion-audit[coco]'"
        ) from e
    h, w = seg.height, seg.width
    if (h, w) != orig:
        raise DataError(
            f"{label}: the COCO image entry says {w}x{h}, the file is {orig[1]}x{orig[0]} "
            "(width x height)"
        )
    fg = np.zeros((h, w), dtype=bool)
    for s, bbox in zip(seg.segments, seg.bboxes, strict=True):
        if s is None:  # no segmentation: the bbox is the foreground
            x, y, bw, bh = bbox
            fg |= box_mask((x, y, x + bw, y + bh), (h, w), (h, w), label).numpy()
            continue
        if isinstance(s, dict):  # RLE, uncompressed (counts list) or compressed (string)
            rle_size = [int(v) for v in s.get("size", [])]
            if rle_size != [h, w]:
                raise DataError(f"{label}: RLE of size {rle_size} for a {h}x{w} image (h x w)")
            rle = coco_mask.frPyObjects(s, h, w) if isinstance(s.get("counts"), list) else s
        else:  # polygons: a list of [x0, y0, x1, y1, ...]
            rle = coco_mask.merge(coco_mask.frPyObjects(s, h, w))
        try:
            fg |= coco_mask.decode(rle).astype(bool)
        except (TypeError, ValueError) as e:
            raise DataError(f"{label}: cannot decode its segmentation: {e}") from None
    return _nearest(fg, size), None


def record_foreground(record: ImageRecord, ds: DatasetConfig, orig: tuple[int, int]) -> Mask | None:
    """The foreground of one image from its own spec, or None when it has none.

    Args:
        record: the image; ``record.fg`` says where its foreground is.
        ds: the dataset section (image size, class ids, ignore value, bounds).
        orig: ``(h, w)`` of the original image in pixels.

    Raises:
        DataError: a missing or undecodable mask, a size mismatch, a class-id list that
            matches no value of the mask, an invalid box, an RLE of the wrong size.
    """
    fg, label = record.fg, f"image {record.image_id!r} ({record.mask})"
    if fg is None:
        return None
    if isinstance(fg, MaskFile):
        full, data = read_file(fg.path, ds.root, "mask", record.image_id, ds.max_file_bytes)
        return _from_mask_bytes(data, full, label, ds, orig)
    if isinstance(fg, MaskBytes):
        return _from_mask_bytes(fg.data, fg.name, label, ds, orig)
    if isinstance(fg, Boxes):
        return _from_boxes(fg, orig, ds.image_size, label)
    return _from_coco(fg, orig, ds.image_size, label)


@functools.lru_cache(maxsize=4)
def _static_mask(path: str, root: str | None, size: tuple[int, int], fv, iv, mb, mp) -> Mask:
    ds = DatasetConfig(
        manifest=path, foreground_values=fv, ignore_value=iv, max_file_bytes=mb, max_pixels=mp
    )
    full, data = read_file(path, root, "static mask", "", mb)
    img = decode_bytes(data, full, "mask", f"dataset.static_mask {full}", mp)
    fg, ignore = _mask_arrays(img, ds, f"dataset.static_mask {full}")
    return _nearest(fg, size), (_nearest(ignore, size) if ignore.any() else None)


def static_foreground(ds: DatasetConfig) -> Mask | None:
    """The one foreground of every image (``static_mask`` or ``static_region``), or None.

    A static mask is resized to ``image_size`` directly: it is drawn for the camera's frame, not
    for one image's size. A region is fractions of the width and height; a resized pixel is
    foreground when its centre lies inside.
    """
    size = (int(ds.image_size[0]), int(ds.image_size[1]))
    if ds.static_mask is not None:
        return _static_mask(
            ds.static_mask,
            None,
            size,
            ds.foreground_values,
            ds.ignore_value,
            ds.max_file_bytes,
            ds.max_pixels,
        )
    if ds.static_region is not None:
        x0, y0, x1, y1 = ds.static_region
        return box_mask((x0, y0, x1, y1), (1, 1), size, "dataset.static_region"), None
    return None


class Item:
    """One decoded image: ``image`` ``(3, H, W)`` float in [0, 1], ``fg``/``ignore`` ``(H, W)``
    bool or None, ``orig`` the original ``(h, w)``."""

    __slots__ = ("fg", "ignore", "image", "orig")

    def __init__(self, image: torch.Tensor, orig: tuple[int, int], mask: Mask | None) -> None:
        self.image, self.orig = image, orig
        self.fg, self.ignore = mask if mask is not None else (None, None)


def load_item(record: ImageRecord, ds: DatasetConfig) -> Item:
    """Decode one record's image and foreground (the static one, when configured, wins).

    Raises:
        DataError: naming the image, for any bad item (see :func:`record_foreground`).
        OSError: a transient I/O failure, which the caller retries.
    """
    bounds = {"image_id": record.image_id, "max_pixels": ds.max_pixels}
    if record.data is not None:
        image, orig = decode_image(record.data, record.path, ds.image_size, **bounds)
    else:
        image, orig = load_image(
            record.path, ds.root, ds.image_size, max_bytes=ds.max_file_bytes, **bounds
        )
    static = static_foreground(ds)
    return Item(image, orig, static if static is not None else record_foreground(record, ds, orig))
