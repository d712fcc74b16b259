"""Decode, resize and mask images: manifest paths -> ``(3, H, W)`` float tensors in ``[0, 1]``.

Images are decoded with Pillow and fully loaded (``.load()``), with
``ImageFile.LOAD_TRUNCATED_IMAGES`` left ``False``, so a truncated or corrupt file is an error
rather than a silently grey-padded image. Every problem with one item raises ``DataError`` naming
its id and path; the batch goes on without it. A transient I/O failure (network, permissions)
raises ``OSError`` instead, so that the caller can retry rather than record bad data.

Pixel order is as stored: EXIF orientation is not applied, the same for images and masks, so a
mask drawn on the stored pixels lines up.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from pipeline.storage.paths import PathEscapeError, join_under
from pipeline.storage.read import UnreadableFileError, read_bytes

__all__ = [
    "DataError",
    "binary_foreground",
    "box_mask",
    "decode_bytes",
    "decode_image",
    "load_image",
    "load_mask",
    "read_file",
]

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_WIDE_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}  # more than 8 bits per sample
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class DataError(ValueError):
    """A bad item (missing, corrupt, outside the root, mismatched mask); names id and path."""


def _item(image_id: str, path: str) -> str:
    return f"image {image_id!r} ({path})" if image_id else f"image {path}"


def read_file(
    path: str, root: str | None, what: str, image_id: str, max_bytes: int | None
) -> tuple[str, bytes]:
    """``(full path, bytes)`` of a data file under ``root``; every problem is a ``DataError``
    naming the item, except transient I/O failures (``OSError``)."""
    try:
        full = join_under(root, path)
    except PathEscapeError as e:
        raise DataError(f"{_item(image_id, path)}: {what} {e}") from None
    try:
        return full, read_bytes(full, max_bytes)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        raise DataError(f"{_item(image_id, path)}: {what} file not found: {full}") from e
    except UnreadableFileError as e:
        hint = " (dataset.max_file_bytes)" if "limit" in str(e) else ""
        raise DataError(f"{_item(image_id, path)}: {what} {e}{hint}") from None


def decode_bytes(
    data: bytes, full: str, what: str, label: str, max_pixels: int | None = None
) -> Image.Image:
    """Open and fully decode; PNG chunk CRCs and the end marker are checked by ``verify``.

    The pixel count is checked from the header before anything is decoded: a few hundred
    kilobytes of PNG can stand for gigabytes of pixels.
    """
    try:
        with Image.open(io.BytesIO(data)) as probe:
            w, h = probe.size
            if max_pixels is not None and w * h > max_pixels:
                raise DataError(
                    f"{label}: {what} {full} is {w}x{h} = {w * h} pixels, over the "
                    f"{max_pixels}-pixel limit (dataset.max_pixels)"
                )
            probe.verify()  # cheap structural check; catches a PNG cut after its pixel data
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now, so truncation raises here and not later
        return img
    except DataError:
        raise
    except _DECODE_ERRORS as e:
        # Pillow names the in-memory buffer ("<_io.BytesIO object at 0x...>"): noise for a user.
        reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
        raise DataError(
            f"{label}: cannot decode {what} {full}: {type(e).__name__}: {reason}"
        ) from e


def _resized_array(img: Image.Image, out_w: int, out_h: int) -> np.ndarray:
    """``(H, W, 3)`` float32 in ``[0, 1]``, resized bilinearly (antialiased when shrinking)."""
    if img.mode in _WIDE_MODES:
        gray = np.asarray(img).astype(np.float32)
        if img.mode != "F":  # integer gray: 16-bit full scale is 65535 (I;16 and I from PNG/TIFF)
            gray /= 65535.0
        # Resized as a float (mode F) image, so 16-bit precision is not rounded to 8 bits.
        fimg = Image.fromarray(np.clip(gray, 0.0, 1.0))
        if fimg.size != (out_w, out_h):
            fimg = fimg.resize((out_w, out_h), Image.Resampling.BILINEAR)
        return np.repeat(np.asarray(fimg, dtype=np.float32)[:, :, None], 3, axis=2)
    # Alpha is dropped, not composited: this matches torchvision's default loader
    # (``Image.convert("RGB")``), so the audited inputs are those the model was trained on.
    rgb = img.convert("RGB")
    if rgb.size != (out_w, out_h):  # 8-bit resize, like torchvision's PIL ``Resize``
        rgb = rgb.resize((out_w, out_h), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.float32) / 255.0


def load_image(
    path: str,
    root: str | None,
    size: Sequence[int],
    *,
    image_id: str = "",
    max_bytes: int | None = None,
    max_pixels: int | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Read, decode and resize one image.

    Modes: L, LA, RGBA, P (palette), CMYK, 1 and other 8-bit modes go through Pillow's RGB
    conversion (alpha dropped); I;16 / I (16-bit gray, 65535 -> 1.0) and F (float, clipped to
    ``[0, 1]``) keep their precision. Resizing is Pillow's bilinear filter, which antialiases
    when shrinking; 8-bit images are resized in 8 bits like torchvision's PIL ``Resize``.

    Args:
        path: manifest path, relative to ``root`` (or an absolute path / URI under it).
        root: local folder or URI the path must stay within; ``None`` takes ``path`` as is.
        size: ``(H, W)`` output size in pixels.
        image_id: the item's id, for messages.
        max_bytes: refuse a file larger than this many bytes (None: no bound).
        max_pixels: refuse an image of more pixels than this, before decoding (None: no bound).

    Returns:
        ``(image, (h, w))``: ``image`` float32 ``(3, H, W)`` in ``[0, 1]``; ``(h, w)`` the
        original size in pixels.

    Raises:
        DataError: the path escapes ``root``; the file is missing, not a regular file (a FIFO,
            a device), too large, corrupt or truncated; the image has too many pixels.

    Example:
        >>> x, (h, w) = load_image("kitchen/1.png", "data/val", (224, 224))  # doctest: +SKIP
        >>> x.shape  # doctest: +SKIP
        torch.Size([3, 224, 224])
    """
    full, data = read_file(path, root, "image", image_id, max_bytes)
    return decode_image(data, full, size, image_id=image_id, max_pixels=max_pixels, name=path)


def decode_image(
    data: bytes,
    where: str,
    size: Sequence[int],
    *,
    image_id: str = "",
    max_pixels: int | None = None,
    name: str | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode and resize one encoded image held in memory, as :func:`load_image` does a file.

    Args:
        data: the encoded bytes (PNG, JPEG, ...).
        where: where they came from (a full path or locator), for messages.
        size, image_id, max_pixels: as for :func:`load_image`.
        name: the item's path as the source writes it (default ``where``), for messages.

    Returns:
        ``(image, (h, w))`` as for :func:`load_image`.
    """
    img = decode_bytes(data, where, "image", _item(image_id, name or where), max_pixels)
    w, h = img.size
    arr = _resized_array(img, int(size[1]), int(size[0]))  # (H, W, 3)
    tensor = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()  # (3, H, W)
    return tensor.clamp_(0.0, 1.0), (h, w)


def binary_foreground(img: Image.Image) -> np.ndarray:
    """``(h, w)`` bool: any non-zero channel; with alpha, transparent pixels are background."""
    mode = img.mode
    if mode in ("YCbCr", "LAB", "HSV"):  # black is not all-zero in these spaces
        img, mode = img.convert("RGB"), "RGB"
    arr = np.asarray(img)  # P and PA: palette indices, so index 0 is background
    if arr.ndim == 2:
        return arr != 0
    if mode in _ALPHA_MODES:
        return (arr[..., :-1] != 0).any(axis=-1) & (arr[..., -1] != 0)
    return (arr != 0).any(axis=-1)


def box_mask(
    box: Sequence[float], original: tuple[int, int], out: tuple[int, int], label: str
) -> torch.Tensor:
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 < x0 or y1 < y0:
        raise DataError(f"{label}: box {list(box)} must be finite x0 <= x1, y0 <= y1")
    (h, w), (out_h, out_w) = original, out
    # A resized pixel is foreground when its centre, mapped back to original pixels, lies in
    # [x0, x1) x [y0, y1): the nearest-neighbour rule used for mask images.
    cy = (torch.arange(out_h, dtype=torch.float64) + 0.5) * (h / out_h)  # (H,)
    cx = (torch.arange(out_w, dtype=torch.float64) + 0.5) * (w / out_w)  # (W,)
    rows, cols = (cy >= y0) & (cy < y1), (cx >= x0) & (cx < x1)
    return rows[:, None] & cols[None, :]  # (H, W)


def load_mask(
    spec: str | None,
    box: Sequence[float] | None,
    root: str | None,
    size: Sequence[int],
    original_size: Sequence[int],
    *,
    image_id: str = "",
    max_bytes: int | None = None,
    max_pixels: int | None = None,
) -> torch.Tensor:
    """The foreground mask of one image on the resized grid.

    A mask image wins over a box when both are given. An empty mask is returned as is: the
    metrics report it as NaN with a reason.

    Args:
        spec: mask image path (relative to ``root``): any non-zero colour channel is foreground
            (a palette image: any non-zero index; with alpha, transparent pixels are background).
        box: ``(x0, y0, x1, y1)`` in original-image pixels, ``x1``/``y1`` exclusive.
        root: as for ``load_image``.
        size: ``(H, W)`` of the resized image.
        original_size: ``(h, w)`` of the original image, as returned by ``load_image``.
        image_id: the item's id, for messages.
        max_bytes, max_pixels: bounds as for ``load_image``.

    Returns:
        ``(H, W)`` bool tensor.

    Raises:
        DataError: no mask or box, a missing/corrupt mask file, a mask whose size differs from
            the image's, or an invalid box.

    Example:
        >>> m = load_mask(None, (10, 20, 50, 60), None, (32, 32), (64, 64))
        >>> m.shape, int(m.sum())
        (torch.Size([32, 32]), 400)
    """
    out = (int(size[0]), int(size[1]))
    orig = (int(original_size[0]), int(original_size[1]))
    source = spec if spec is not None else "no mask" if box is None else f"box {list(box)}"
    label = _item(image_id, source)
    if spec is None:
        if box is None:
            raise DataError(f"{label}: neither a mask nor a box is given")
        return box_mask(box, orig, out, label)
    full, data = read_file(spec, root, "mask", image_id, max_bytes)
    img = decode_bytes(data, full, "mask", label, max_pixels)
    if img.size != (orig[1], orig[0]):
        raise DataError(
            f"{label}: mask {img.size[0]}x{img.size[1]} does not match image "
            f"{orig[1]}x{orig[0]} (width x height)"
        )
    fg = Image.fromarray(binary_foreground(img).astype(np.uint8) * 255)  # mode L
    if fg.size != (out[1], out[0]):
        fg = fg.resize((out[1], out[0]), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(fg) > 127)  # (H, W) bool
