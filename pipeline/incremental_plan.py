"""Where each window changes each activation: receptive-field geometry of a window grid.

For every window the changed box is propagated through the trunk (a conv/pool maps input rows
``[lo, hi)`` to the outputs whose windows touch them; element-wise ops keep the box; a sum of
branches takes the union). Each activation then gets one region size, the largest changed box
of any window, so that all copies of a batch run through a layer in ONE call; a region is
shifted inwards at the border (same size, still inside the map) rather than clipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.geometry import WindowGrid
from pipeline.incremental_graph import Entry, Step

__all__ = ["Plan", "Region", "Tiles", "make_plan"]

_MIN_TILE_FEATURES = 256  # features per tile: keeps each tile's matmul compute-bound


@dataclass(frozen=True)
class Region:
    """The recomputed part of one activation, for every window.

    Attributes:
        size: ``(h, w)``, the same for all windows.
        origin: ``(P, 2)`` int64 top-left per window, inside the activation.
    """

    size: tuple[int, int]
    origin: torch.Tensor


@dataclass(frozen=True)
class Tiles:
    """Tiling of a flatten + Linear head (see :func:`pipeline.incremental_ops.linear_update`).

    Attributes:
        tile: ``(ty, tx)`` tile size in activation pixels.
        blocks: ``(nby, nbx)`` tiles in each window's block.
        n_tiles_x: tiles per row of the activation.
        first: ``(P, 2)`` first tile (row, col) of each window's block.
        offset: ``(P, 2)`` region origin relative to its block, in pixels.
        weight: ``(tiles, C * ty * tx, O)`` the Linear's weights tile by tile (zero-padded).
    """

    tile: tuple[int, int]
    blocks: tuple[int, int]
    n_tiles_x: int
    first: torch.Tensor
    offset: torch.Tensor
    weight: torch.Tensor


@dataclass(frozen=True)
class Plan:
    """Everything about one window grid that does not depend on the images.

    Attributes:
        boxes: ``(P, 6)`` window boxes ``[c0, c1, y0, y1, x0, x1]``.
        regions: region of every trunk node.
        crops: ``(step, input)`` pairs of element-wise steps whose input region differs from
            theirs (the input is cropped to the step's region first).
        tiles: tiling of every ``"linear"`` entry.
    """

    boxes: torch.Tensor
    regions: dict[str, Region]
    crops: frozenset[tuple[str, str]]
    tiles: dict[str, Tiles]


def _changed_boxes(steps: list[Step], grid: WindowGrid) -> dict[str, torch.Tensor]:
    """``(P, 4)`` changed box ``[y0, y1, x0, x1)`` of every trunk node, for every window."""
    out: dict[str, torch.Tensor] = {}
    for st in steps:
        if st.kind == "input":
            out[st.name] = grid.boxes()[:, 2:]
        elif st.kind == "window" and st.axes is not None:
            src = out[st.inputs[0]]
            y0, y1 = st.axes[0].out_box(src[:, 0], src[:, 1], st.shape[1])
            x0, x1 = st.axes[1].out_box(src[:, 2], src[:, 3], st.shape[2])
            out[st.name] = torch.stack([y0, y1, x0, x1], dim=1)
        else:
            b = torch.stack([out[u] for u in st.inputs])  # (inputs, P, 4)
            lo, hi = b[..., 0::2].amin(dim=0), b[..., 1::2].amax(dim=0)  # union
            out[st.name] = torch.stack([lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1]], dim=1)
    return out


def _region(box: torch.Tensor, shape: tuple[int, int, int]) -> Region:
    """The largest box size, each window's box shifted inwards to stay inside the map."""
    size = []
    origin = []
    for axis, dim in ((0, shape[1]), (1, shape[2])):
        lo, hi = box[:, 2 * axis], box[:, 2 * axis + 1]
        n = min(dim, max(1, int((hi - lo).max())))
        size.append(n)
        origin.append(torch.minimum(lo, torch.full_like(lo, dim - n)).clamp(min=0))
    return Region((size[0], size[1]), torch.stack(origin, dim=1))


def _axis_tiling(origin: torch.Tensor, n: int, dim: int, t: int) -> tuple[int, int, torch.Tensor]:
    """Tiles per block, tiles along the axis and each window's first tile for tile size ``t``."""
    total = math.ceil(dim / t)
    need = int(((origin + n + t - 1) // t - origin // t).max())
    blocks = min(need, total)
    return blocks, total, torch.minimum(origin // t, torch.full_like(origin, total - blocks))


def _tiles(entry: Entry, step: Step, region: Region, device: torch.device) -> Tiles:
    """Pick the tile size that multiplies the fewest weights per copy (with at least
    ``_MIN_TILE_FEATURES`` features per tile), and lay the weights out tile by tile."""
    c, h, w = step.shape
    (hb, wb), org = region.size, region.origin
    span_y = {t: _axis_tiling(org[:, 0], hb, h, t)[0] * t for t in range(1, h + 1)}
    span_x = {t: _axis_tiling(org[:, 1], wb, w, t)[0] * t for t in range(1, w + 1)}
    floor = min(_MIN_TILE_FEATURES, c * h * w)
    # fewest weights multiplied per copy, then the largest tiles (fewest matmuls)
    _, _, ty, tx = min(
        (span_y[ty] * span_x[tx], -ty * tx, ty, tx)
        for ty in span_y
        for tx in span_x
        if c * ty * tx >= floor
    )
    nby, total_y, fy = _axis_tiling(org[:, 0], hb, h, ty)
    nbx, total_x, fx = _axis_tiling(org[:, 1], wb, w, tx)
    lin = entry.module
    assert lin is not None
    wt = lin.weight.detach().reshape(-1, c, h, w)  # (O, C, H, W), flatten order
    wt = torch.nn.functional.pad(wt, (0, total_x * tx - w, 0, total_y * ty - h))
    wt = wt.reshape(-1, c, total_y, ty, total_x, tx).permute(2, 4, 1, 3, 5, 0)
    first = torch.stack([fy, fx], dim=1)
    return Tiles(
        tile=(ty, tx),
        blocks=(nby, nbx),
        n_tiles_x=total_x,
        first=first.to(device),
        offset=(org - first * torch.tensor([ty, tx])).to(device),
        weight=wt.reshape(total_y * total_x, c * ty * tx, -1).contiguous().to(device),
    )


def make_plan(
    steps: list[Step], entries: dict[str, Entry], grid: WindowGrid, device: torch.device
) -> Plan:
    """Regions, crops and head tilings of every node for the windows of ``grid``."""
    boxes = _changed_boxes(steps, grid)
    regions = {st.name: _region(boxes[st.name], st.shape) for st in steps}
    crops = set()
    for st in steps:
        if st.kind == "pointwise":
            for u in st.inputs:
                same = regions[u].size == regions[st.name].size and torch.equal(
                    regions[u].origin, regions[st.name].origin
                )
                if not same:
                    crops.add((st.name, u))
    by_name = {st.name: st for st in steps}
    tiles = {
        e.name: _tiles(e, by_name[e.source], regions[e.source], device)
        for e in entries.values()
        if e.kind == "linear"
    }
    return Plan(
        boxes=grid.boxes().to(device),
        regions={k: Region(r.size, r.origin.to(device)) for k, r in regions.items()},
        crops=frozenset(crops),
        tiles=tiles,
    )
