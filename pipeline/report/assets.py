"""The report's figure files: each image, its occlusion map, swaps and charts, written once into
``img/`` beside the pages that show them.

Images and maps are drawn with numpy and Pillow, not matplotlib figures: a report draws every
image of every group, and a matplotlib figure costs about a hundred times more than encoding the
pixels. The pages lay them out (side by side, and the map over the image with an opacity
control) in HTML. File names are hashes of the image id, so any id (slashes, quotes, control
characters) makes a safe name, and a group page and the index share one file per image.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from PIL import Image

__all__ = [
    "IMG_DIR",
    "Assets",
    "Card",
    "display_map",
    "file_key",
    "heat_rgb",
    "picture_rgb",
    "put",
    "single_thread",
]

IMG_DIR = "img"  # figure files, relative to the report folder
_OUTLINE = np.array([0, 229, 255], dtype=np.uint8)  # the foreground outline: cyan
_MAP_COLORS = colormaps["RdBu_r"]  # red: occluding lowers the score; blue: raises it


def file_key(*parts: str) -> str:
    """A short file-name-safe key of ``parts`` (16 hex digits of their SHA-256)."""
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:16]


@dataclass(frozen=True)
class Card:
    """One image as the pages show it: its files (relative to the report folder) or why not.

    Attributes:
        image_id: the stored id.
        anchor: the element id on its group page (``img-<key>``).
        caption: ratio, share and path, in words.
        image: the picture with its foreground outline (``img/<key>.jpg``), or None.
        heat: the occlusion map (``img/<key>-map.png``), or None when it cannot be drawn.
        message: why the image could not be drawn (empty when it was).
    """

    image_id: str
    anchor: str
    caption: str
    image: str | None = None
    heat: str | None = None
    message: str = ""


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread inside the block (the thread count is restored after).

    Expanding a map is a few tiny einsums; torch's thread pool costs more than the work, and on
    a busy two-core machine it made each map 15 times slower (15 ms instead of 0.8 ms).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=64)
def _spread(
    image: tuple[int, int, int], window: tuple[int, ...], stride: tuple[int, ...]
) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray, np.ndarray]:
    """The window grid's counts and, per axis, each pixel's share of each covering window:
    ``(Gc,)`` (averaged over channels), ``(H, Gh)`` and ``(W, Gw)``, rows summing to 1."""
    from pipeline.kernel.geometry import WindowGrid

    grid = WindowGrid.create(image, list(window), list(stride))
    shares = []
    for axis in range(3):
        cover = grid.cover(axis).numpy()  # (D, G) 0/1, float64
        shares.append(cover / cover.sum(axis=1, keepdims=True))
    return grid.counts, shares[0].mean(axis=0), shares[1], shares[2]


def display_map(row: Mapping[str, Any]) -> np.ndarray:
    """(H, W) float64 channel-mean map of a stored row: each pixel the mean delta of the windows
    covering it, as :func:`pipeline.kernel.occlusion.expand_map` computes it (the same window
    geometry; the mean over windows is separable by axis), in numpy matrix products. Torch's
    four-operand einsum costs twenty times more on maps this small.
    """
    image = (int(row["image_c"]), int(row["image_h"]), int(row["image_w"]))
    counts, c, h, w = _spread(image, tuple(row["window"]), tuple(row["stride"]))
    delta = np.asarray(row["delta"], dtype=np.float64).reshape(counts)  # (Gc, Gh, Gw)
    return h @ np.tensordot(c, delta, axes=1) @ w.T  # (H, Gh) @ (Gh, Gw) @ (Gw, W)


def put(path: Path, data: bytes | str) -> None:
    """Write a figure or a group page in place.

    Not :func:`pipeline.storage.atomic.atomic_write`: these files are derived from the run
    folder and written before the ``index.html`` that links them (which is written atomically,
    last). A temporary file and a rename each made 10,000 small files cost 0.5-0.7 ms apiece
    instead of 0.1 ms on a shared two-core machine, more than drawing them.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)


def _outline(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: foreground pixels with a background 4-neighbour (a one-pixel outline)."""
    padded = np.pad(mask, 1, mode="edge")
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def picture_rgb(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """(H, W, 3) uint8 of an image in [0, 1], with the mask's outline drawn in cyan.

    Args:
        image: (H, W, 3) or (H, W, 1) float in [0, 1].
        mask: (H, W) bool foreground, or None (no outline).
    """
    rgb = np.clip(image, 0.0, 1.0)
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    out = (rgb[..., :3] * 255.0 + 0.5).astype(np.uint8)
    if mask is not None and mask.any() and not mask.all():
        out[_outline(mask)] = _OUTLINE
    return out


def heat_rgb(heat: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """(H, W, 3) uint8 colours of an occlusion map, a diverging scale centred on zero.

    Args:
        heat: (H, W) score drop per pixel; the scale runs from ``-max|heat|`` (blue) to
            ``+max|heat|`` (red), each map on its own scale.
        mask: (H, W) bool foreground, outlined in black so the map reads against the object.
    """
    finite = np.abs(heat[np.isfinite(heat)])
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    scaled = np.nan_to_num(heat / vmax, nan=0.0, posinf=1.0, neginf=-1.0)
    out = (_MAP_COLORS((scaled + 1.0) / 2.0)[..., :3] * 255.0 + 0.5).astype(np.uint8)
    if mask is not None and mask.any() and not mask.all():
        out[_outline(mask)] = 0
    return out


def _encode(rgb: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":  # photos: a tenth of a PNG's size; 4:4:4 keeps the outline's colour
        Image.fromarray(rgb).save(buf, format="JPEG", quality=90, subsampling=0)
    else:  # maps are flat over each stride block and compress well losslessly
        Image.fromarray(rgb).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


class Assets:
    """Writes figure files into ``out/img`` and hands back their relative names.

    Args:
        out: the local report folder.
        images: a :class:`pipeline.data.stored.StoredImages` of the run's dataset, or None
            (a run folder without a record: no image can be read).
        tag: prefixes every key, so two runs' maps of one image (a comparison) differ.
    """

    def __init__(self, out: Path, images: Any, tag: str = "") -> None:
        self.out = out
        self.images = images
        self.tag = tag
        (out / IMG_DIR).mkdir(parents=True, exist_ok=True)
        self._written: set[str] = set()  # an image shown in several places is written once

    @property
    def written(self) -> int:
        """Files written so far."""
        return len(self._written)

    def _write(self, name: str, data: Callable[[], bytes]) -> str:
        """Write ``img/<name>`` once (``data`` is called only then); return its relative path."""
        if name not in self._written:
            put(self.out / IMG_DIR / name, data())
            self._written.add(name)
        return f"{IMG_DIR}/{name}"

    def chart(self, name: str, png: bytes) -> str:
        """Write a chart's PNG bytes as ``img/<name>.png``."""
        return self._write(f"{name}.png", lambda: png)

    def load(self, row: Mapping[str, Any]) -> Any:
        """The row's decoded image and foreground (:class:`pipeline.data.foreground.Item`).

        Raises:
            Exception: whatever the read raised (a missing file, no record to read with).
        """
        if self.images is None:
            raise FileNotFoundError("the run folder has no run.json: its images are unknown")
        return self.images.load(row)

    def card(self, row: Mapping[str, Any], item: Any, caption: str) -> Card:
        """Draw one stored row: the picture and, when its grid expands, the map.

        Args:
            row: the stored row (``image_id``, ``delta``, ``image_c``/``_h``/``_w``,
                ``window``, ``stride``).
            item: its loaded image (``item.image`` (C, H, W) in [0, 1], ``item.fg``), or the
                exception that loading raised.
            caption: the caption in words.
        """
        image_id = str(row["image_id"])
        key = file_key(self.tag, image_id)
        anchor = f"img-{file_key(image_id)}"
        if isinstance(item, BaseException):
            return Card(image_id, anchor, caption, message=f"Could not load {image_id}: {item}")
        image = np.asarray(item.image.permute(1, 2, 0), dtype=np.float64)  # (H, W, C)
        mask = None if item.fg is None else np.asarray(item.fg, dtype=bool)
        src = self._write(f"{key}.jpg", lambda: _encode(picture_rgb(image, mask), "JPEG"))
        try:
            heat = display_map(row)  # (H, W)
        except Exception as exc:  # a stored map that cannot be expanded: the picture alone
            return Card(image_id, anchor, f"{caption} [map: {exc}]", image=src)
        heat_src = self._write(f"{key}-map.png", lambda: _encode(heat_rgb(heat, mask), "PNG"))
        return Card(image_id, anchor, caption, image=src, heat=heat_src)

    def picture(self, name: str, image: Any, mask: Any = None) -> str:
        """Write a (C, H, W) tensor in [0, 1] (a rebuilt swap) as ``img/<key>.jpg``; an image
        already written under ``name`` (its card's picture) is not drawn again."""

        def encode() -> bytes:
            pixels = np.asarray(image.permute(1, 2, 0), dtype=np.float64)  # (H, W, C)
            fg = None if mask is None else np.asarray(mask, dtype=bool)
            return _encode(picture_rgb(pixels, fg), "JPEG")

        return self._write(f"{file_key(self.tag, name)}.jpg", encode)

    def grid(self, name: str, grid: np.ndarray) -> str:
        """Write a small map (a strategy's mean map, (h, w) cells) as a PNG of one pixel per
        cell; the page enlarges it without smoothing (``image-rendering: pixelated``)."""
        rgb = heat_rgb(np.asarray(grid, dtype=np.float64), None)
        return self._write(f"{file_key(self.tag, name)}-grid.png", lambda: _encode(rgb, "PNG"))
