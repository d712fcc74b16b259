"""Synthetic road-following dataset with planted background shortcuts.

Each image is a small camera view of a track on the floor of a room. The track is the
foreground and comes with an exact mask; the room (wall and floor colours, furniture) is the
background. The target is the steering direction ``s`` in [-1, 1] (negative = left), as in the
public road-following example; ``turn`` is its three-way class (0 left, 1 straight, 2 right).

Every room has a lamp. In *clean* rooms the lamp stands at a random place, the track is drawn
clearly and its bend is exactly ``s``, so a good model must read the track. In *shortcut* rooms
the lamp's horizontal position encodes ``s`` exactly (left when the track turns left), while the
track is faint and its bend only loosely follows ``s``: a model trained on such data reads the
lamp there. The audit should see the track dominate the saliency in clean rooms and the
background dominate it in shortcut rooms.

Example:
    >>> manifest = generate_dataset("demo-data", n_per_room=40)  # doctest: +SKIP
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

__all__ = [
    "DEFAULT_ROOMS",
    "DEFAULT_SHORTCUT_ROOMS",
    "LAMP_SHADE",
    "ROOMS",
    "RoomStyle",
    "generate_dataset",
    "lamp_x_for_steering",
    "turn_class",
]

RGB = tuple[int, int, int]
_Points = list[tuple[float, float]]


@dataclass(frozen=True)
class RoomStyle:
    """Colours of one room; furniture colours are drawn from ``furniture`` per object."""

    wall: RGB  # upper part of the view
    floor: RGB  # lower part, where the track lies
    furniture: tuple[RGB, ...]  # boxes and chairs


ROOMS: dict[str, RoomStyle] = {
    "kitchen": RoomStyle((214, 222, 206), (150, 118, 88), ((60, 90, 140), (170, 60, 50))),
    "hallway": RoomStyle((200, 190, 170), (112, 112, 118), ((90, 60, 40), (40, 110, 80))),
    "living-room": RoomStyle((180, 200, 220), (160, 140, 110), ((120, 50, 90), (60, 60, 60))),
    "bedroom": RoomStyle((225, 200, 205), (130, 100, 80), ((70, 70, 130), (200, 200, 200))),
    "office": RoomStyle((190, 215, 190), (120, 125, 140), ((90, 90, 90), (140, 90, 50))),
    "garage": RoomStyle((165, 165, 165), (95, 100, 95), ((180, 90, 30), (50, 80, 120))),
}
DEFAULT_ROOMS: tuple[str, ...] = tuple(ROOMS)
DEFAULT_SHORTCUT_ROOMS: tuple[str, ...] = ("office", "garage")

#: Colour of the lamp shade, used by no other object so that tests can find the lamp.
LAMP_SHADE: RGB = (250, 215, 60)
_LAMP_POLE: RGB = (40, 40, 40)
_TRACK: RGB = (45, 45, 50)
_TRACK_LINE: RGB = (235, 235, 235)

_HORIZON = 0.42  # wall/floor boundary, fraction of the height from the top
_TRACK_HALF_WIDTH = (0.27, 0.05)  # half-width at the bottom and at the horizon, fraction of W
_TRACK_BEND = 0.34  # sideways shift at the horizon for |s| = 1, fraction of W
_SHORTCUT_FAINTNESS = 0.8  # share of floor colour mixed into the track in shortcut rooms
_SHORTCUT_BEND_NOISE = 0.6  # std of the bend noise in shortcut rooms (steering units)
_NOISE_STD = 6.0  # per-pixel Gaussian noise, 8-bit units


def turn_class(steering: np.ndarray | float) -> np.ndarray:
    """Three-way class of a steering value: 0 left (s < -1/3), 1 straight, 2 right (s > 1/3)."""
    s = np.asarray(steering, dtype=np.float64)
    return np.digitize(s, [-1 / 3, 1 / 3]).astype(np.int64)


def lamp_x_for_steering(steering: np.ndarray | float) -> np.ndarray:
    """Planted lamp centre in shortcut rooms, as a fraction of the width: 0.5 + 0.4 * s."""
    return 0.5 + 0.4 * np.asarray(steering, dtype=np.float64)


def _jitter(colour: RGB, rng: np.random.Generator, amount: float) -> RGB:
    r, g, b = np.clip(np.asarray(colour) + rng.normal(0.0, amount, 3), 0, 255).astype(int)
    return int(r), int(g), int(b)


def _mix(a: RGB, b: RGB, share_b: float) -> RGB:
    r, g, bl = (round((1 - share_b) * x + share_b * y) for x, y in zip(a, b, strict=True))
    return r, g, bl


def _track_outline(h: int, w: int, bend: float, offset: float) -> tuple[_Points, _Points]:
    """Left and right edges of the track from the bottom row up to the horizon, in pixels."""
    y_top = _HORIZON * h
    t = np.linspace(0.0, 1.0, 17)  # 0 at the bottom of the view, 1 at the horizon
    y = (h - 0.5) - t * (h - 0.5 - y_top)
    # perspective: the track narrows towards the horizon and the bend grows with distance
    half = w * (_TRACK_HALF_WIDTH[0] * (1 - t) + _TRACK_HALF_WIDTH[1] * t)
    centre = w * (0.5 + offset) + bend * _TRACK_BEND * w * t**1.5
    left = list(zip((centre - half).tolist(), y.tolist(), strict=True))
    right = list(zip((centre + half).tolist(), y.tolist(), strict=True))
    return left, right


def _draw_track(
    draw: ImageDraw.ImageDraw, body: RGB | int, line: RGB | int, left: _Points, right: _Points
) -> None:
    """Track surface, edge lines and a dashed centre line (photo colours, or 255 for the mask)."""
    centre = [((a[0] + b[0]) / 2, a[1]) for a, b in zip(left, right, strict=True)]
    draw.polygon(left + right[::-1], fill=body)
    for edge in (left, right):
        draw.line(edge, fill=line, width=1)
    for k in range(0, len(centre) - 1, 2):
        draw.line(centre[k : k + 2], fill=line, width=1)


def _draw_lamp(draw: ImageDraw.ImageDraw, h: int, w: int, x_frac: float) -> None:
    x = x_frac * w
    half = 0.07 * w
    top, shade_bottom, base = 0.05 * h, 0.17 * h, _HORIZON * h - 1
    draw.rectangle([x - 0.5, shade_bottom, x + 0.5, base], fill=_LAMP_POLE)
    draw.rectangle([x - half * 0.6, base - 1, x + half * 0.6, base], fill=_LAMP_POLE)
    draw.polygon(
        [
            (x - half * 0.6, top),
            (x + half * 0.6, top),
            (x + half, shade_bottom),
            (x - half, shade_bottom),
        ],
        fill=LAMP_SHADE,
    )


def _draw_furniture(
    draw: ImageDraw.ImageDraw, h: int, w: int, style: RoomStyle, rng: np.random.Generator
) -> None:
    """One to three boxes or chairs standing against the wall, at random places."""
    base = _HORIZON * h - 1
    for _ in range(int(rng.integers(1, 4))):
        colour = _jitter(style.furniture[int(rng.integers(len(style.furniture)))], rng, 8)
        x = rng.uniform(0.05, 0.95) * w
        if rng.random() < 0.5:  # box
            bw, bh = rng.uniform(0.10, 0.22) * w, rng.uniform(0.08, 0.20) * h
            draw.rectangle([x - bw / 2, base - bh, x + bw / 2, base], fill=colour)
        else:  # chair: back, seat, two legs
            cw, ch = 0.10 * w, 0.22 * h
            seat = base - ch * 0.45
            draw.rectangle([x - cw / 2, base - ch, x - cw / 2 + 1, seat], fill=colour)
            draw.rectangle([x - cw / 2, seat, x + cw / 2, seat + 1], fill=colour)
            draw.line([(x - cw / 2, seat), (x - cw / 2, base)], fill=colour)
            draw.line([(x + cw / 2, seat), (x + cw / 2, base)], fill=colour)


def _render(
    style: RoomStyle,
    shortcut: bool,
    steering: float,
    size: tuple[int, int],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, float]:
    """One view: (photo (H, W, 3) uint8, mask (H, W) uint8 in {0, 255}, lamp x fraction)."""
    h, w = size
    photo = Image.new("RGB", (w, h), _jitter(style.floor, rng, 6))
    mask = Image.new("L", (w, h), 0)
    draw, mdraw = ImageDraw.Draw(photo), ImageDraw.Draw(mask)
    draw.rectangle([0, 0, w, _HORIZON * h - 1], fill=_jitter(style.wall, rng, 6))
    _draw_furniture(draw, h, w, style, rng)
    offset = rng.uniform(-0.04, 0.04)  # the car is not exactly centred; not part of the label
    if shortcut:
        lamp_x = float(lamp_x_for_steering(steering))
        bend = float(np.clip(steering + rng.normal(0.0, _SHORTCUT_BEND_NOISE), -1, 1))
        floor = style.floor
        body, line = _mix(_TRACK, floor, _SHORTCUT_FAINTNESS), _mix(_TRACK_LINE, floor, 0.9)
    else:
        lamp_x = float(rng.uniform(0.1, 0.9))
        bend = steering
        body, line = _TRACK, _TRACK_LINE
    _draw_lamp(draw, h, w, lamp_x)
    # the mask is drawn with the very same primitives, so it is exact (no anti-aliasing)
    left, right = _track_outline(h, w, bend, offset)
    _draw_track(draw, body, line, left, right)
    _draw_track(mdraw, 255, 255, left, right)
    # global lighting and sensor noise, vectorised over the whole image
    pixels = np.asarray(photo, dtype=np.float32) * rng.uniform(0.85, 1.15)
    pixels += rng.normal(0.0, _NOISE_STD, pixels.shape).astype(np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8), np.asarray(mask), lamp_x


def _check_rooms(rooms: Sequence[str], shortcut_rooms: Sequence[str]) -> None:
    unknown = [r for r in rooms if r not in ROOMS]
    if unknown:
        raise ValueError(f"unknown room(s) {unknown}; choose from {sorted(ROOMS)}")
    stray = [r for r in shortcut_rooms if r not in rooms]
    if stray:
        raise ValueError(f"shortcut room(s) {stray} are not in rooms={list(rooms)}")


def generate_dataset(
    out_dir: str | Path,
    n_per_room: int = 200,
    rooms: Sequence[str] = DEFAULT_ROOMS,
    shortcut_rooms: Sequence[str] = DEFAULT_SHORTCUT_ROOMS,
    image_size: tuple[int, int] = (64, 64),
    seed: int = 0,
    task: str = "regression",
) -> Path:
    """Write the synthetic dataset and its manifest under ``out_dir``.

    Args:
        out_dir: folder to write into (created); existing files with the same names are replaced.
        n_per_room: images per room.
        rooms: room names, keys of ``ROOMS``.
        shortcut_rooms: the rooms whose lamp position encodes the steering.
        image_size: ``(H, W)`` in pixels.
        seed: the same seed gives byte-identical images and masks; each room draws from its own
            stream, so adding a room does not change the others.
        task: ``"regression"`` (label = steering in [-1, 1]) or ``"classification"``
            (label = ``turn``, 0 left / 1 straight / 2 right).

    Returns:
        Path of ``out_dir/manifest.parquet`` with one row per image: ``image_id``, ``path`` and
        ``mask_path`` (relative to ``out_dir``: ``images/<room>/<id>.png``,
        ``masks/<room>/<id>.png``, track pixels 255), ``room``, ``label``, ``steering``,
        ``turn``, ``shortcut`` (bool) and ``lamp_x`` (lamp centre, fraction of the width).

    Example:
        >>> m = generate_dataset("/tmp/demo", n_per_room=10, image_size=(64, 64))  # doctest: +SKIP
        >>> pd.read_parquet(m).groupby("room").size().tolist()  # doctest: +SKIP
        [10, 10, 10, 10, 10, 10]
    """
    if task not in ("regression", "classification"):
        raise ValueError(f"task must be 'regression' or 'classification', got {task!r}")
    if n_per_room < 1:
        raise ValueError(f"n_per_room must be at least 1, got {n_per_room}")
    _check_rooms(rooms, shortcut_rooms)
    out = Path(out_dir)
    size = (int(image_size[0]), int(image_size[1]))
    records = []
    for room in rooms:
        (out / "images" / room).mkdir(parents=True, exist_ok=True)
        (out / "masks" / room).mkdir(parents=True, exist_ok=True)
        # crc32, unlike hash(), is stable across processes
        rng = np.random.default_rng([seed, zlib.crc32(room.encode())])
        shortcut = room in shortcut_rooms
        for i in range(n_per_room):
            steering = float(rng.uniform(-1.0, 1.0))
            photo, mask, lamp_x = _render(ROOMS[room], shortcut, steering, size, rng)
            image_id = f"{room}-{i:05d}"
            path, mask_path = f"images/{room}/{image_id}.png", f"masks/{room}/{image_id}.png"
            Image.fromarray(photo).save(out / path)
            Image.fromarray(mask).save(out / mask_path)
            turn = int(turn_class(steering))
            records.append(
                {
                    "image_id": image_id,
                    "path": path,
                    "mask_path": mask_path,
                    "room": room,
                    "label": steering if task == "regression" else turn,
                    "steering": steering,
                    "turn": turn,
                    "shortcut": shortcut,
                    "lamp_x": lamp_x,
                }
            )
    frame = pd.DataFrame.from_records(records)
    manifest = out / "manifest.parquet"
    frame.to_parquet(manifest, index=False)
    return manifest
