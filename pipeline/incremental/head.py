"""Flatten + Linear heads updated from the changed features only.

For ``y = W @ flatten(a)``, an occluded copy gives ``y = y0 + W[:, changed] @ (a_new - a_old)``
with the changed features inside a small box of the last activation. Multiplying each copy's
slice of ``W`` separately would read megabytes of weights per copy (a memory-bound
matrix-vector product); instead the activation is cut into tiles, each copy's box is covered by
a fixed block of tiles, and the (copy, tile) products are grouped by tile into one batched
matmul, so each tile's weights are read once per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.incremental.graph import Entry

__all__ = ["Tiles", "linear_update", "make_tiles"]

_MIN_TILE_FEATURES = 256  # features per tile: keeps each tile's matmul compute-bound


@dataclass(frozen=True)
class Tiles:
    """Tiling of a flatten + Linear head for one window grid (see :func:`linear_update`).

    Attributes:
        tile: ``(ty, tx)`` tile size in activation pixels.
        blocks: ``(nby, nbx)`` tiles in each window's block.
        n_tiles_x: tiles per row of the activation.
        first: ``(P, 2)`` first tile (row, col) of each window's block.
        offset: ``(P, 2)`` region origin relative to its block, in pixels.
        weight: ``(tiles, ty * tx * C, O)`` the Linear's weights tile by tile, channels last
            within a tile (zero-padded past the edge).
    """

    tile: tuple[int, int]
    blocks: tuple[int, int]
    n_tiles_x: int
    first: torch.Tensor
    offset: torch.Tensor
    weight: torch.Tensor


def _axis_tiling(origin: torch.Tensor, n: int, dim: int, t: int) -> tuple[int, int, torch.Tensor]:
    """Tiles per block, tiles along the axis and each window's first tile for tile size ``t``."""
    total = math.ceil(dim / t)
    need = int(((origin + n + t - 1) // t - origin // t).max())
    blocks = min(need, total)
    return blocks, total, torch.minimum(origin // t, torch.full_like(origin, total - blocks))


def _padded_cost(origin: torch.Tensor, n: int, dim: int, t: int) -> int:
    """Rows of the padded tile matmul along one axis when every window position occurs once:
    tiles x the busiest tile's count x tile size (windows form a grid, so the 2-D cost is the
    product of the two axes')."""
    rows = torch.unique(origin)
    blocks, total, first = _axis_tiling(rows, n, dim, t)
    hits = torch.bincount((first[:, None] + torch.arange(blocks)).reshape(-1), minlength=total)
    return total * int(hits.max()) * t


def make_tiles(
    entry: Entry,
    shape: tuple[int, int, int],
    size: tuple[int, int],
    origin: torch.Tensor,
    device: torch.device,
) -> Tiles:
    """Tiling of a ``"linear"`` entry for one window grid.

    Picks the tile size with the cheapest padded tile matmul (at least ``_MIN_TILE_FEATURES``
    features per tile) and lays the weights out tile by tile.

    Args:
        entry: the entry (its ``module`` is the Linear).
        shape: ``(C, H, W)`` of the flattened activation.
        size: ``(h, w)`` of its region; ``origin``: ``(P, 2)`` region origin per window.
        device: where the weights and index tensors go.
    """
    c, h, w = shape
    (hb, wb), org = size, origin
    cost_y = {t: _padded_cost(org[:, 0], hb, h, t) for t in range(1, h + 1)}
    cost_x = {t: _padded_cost(org[:, 1], wb, w, t) for t in range(1, w + 1)}
    floor = min(_MIN_TILE_FEATURES, c * h * w)
    _, _, ty, tx = min(
        (cost_y[ty] * cost_x[tx], -ty * tx, ty, tx)  # then the largest tiles (fewest matmuls)
        for ty in cost_y
        for tx in cost_x
        if c * ty * tx >= floor
    )
    nby, total_y, fy = _axis_tiling(org[:, 0], hb, h, ty)
    nbx, total_x, fx = _axis_tiling(org[:, 1], wb, w, tx)
    lin = entry.module
    assert lin is not None
    wt = lin.weight.detach().reshape(-1, c, h, w)  # (O, C, H, W), flatten order
    wt = torch.nn.functional.pad(wt, (0, total_x * tx - w, 0, total_y * ty - h))
    wt = wt.reshape(-1, c, total_y, ty, total_x, tx).permute(2, 4, 3, 5, 1, 0)
    first = torch.stack([fy, fx], dim=1)
    return Tiles(
        tile=(ty, tx),
        blocks=(nby, nbx),
        n_tiles_x=total_x,
        first=first.to(device),
        offset=(org - first * torch.tensor([ty, tx])).to(device),
        weight=wt.reshape(total_y * total_x, ty * tx * c, -1).contiguous().to(device),
    )


def linear_update(
    delta: torch.Tensor,
    offset: torch.Tensor,
    first: torch.Tensor,
    weight: torch.Tensor,
    tile: tuple[int, int],
    blocks: tuple[int, int],
    n_tiles_x: int,
) -> torch.Tensor:
    """``W @ flatten(a_new - a_old)`` of each copy, multiplying only the changed features.

    The activation is cut into ``tile``-sized tiles; each copy's change lies in a block of
    ``blocks`` tiles. Products are grouped by tile into one batched matmul (zero-padded to the
    busiest tile), so each tile's weights are read once per batch instead of once per copy;
    one ``index_copy_`` scatters the changes straight into that matmul's input.

    Args:
        delta: ``(B, hr, wr, C)`` change of the region of each copy (channels-last).
        offset: ``(B, 2)`` region origin relative to the first pixel of its block.
        first: ``(B, 2)`` tile index (row, col) of each copy's block.
        weight: ``(tiles, ty * tx * C, O)`` the Linear's weights, tile by tile.
        tile: ``(ty, tx)`` in activation pixels; ``blocks``: ``(nby, nbx)`` tiles per copy.
        n_tiles_x: tiles per row of the activation.

    Returns:
        ``(B, O)`` change of the Linear's output.
    """
    b, hr, wr, c = delta.shape
    (ty, tx), (nby, nbx) = tile, blocks
    dev = delta.device
    rows = first[:, :1] + torch.arange(nby, device=dev)  # (B, nby)
    cols = first[:, 1:] + torch.arange(nbx, device=dev)  # (B, nbx)
    tid = (rows[:, :, None] * n_tiles_x + cols[:, None, :]).reshape(-1)  # (M,) copy-major pairs
    lo, hi = int(tid.min()), int(tid.max()) + 1  # a contiguous range: a view of the weights
    tid = tid - lo
    order = torch.argsort(tid, stable=True)
    counts = torch.bincount(tid, minlength=hi - lo)
    depth = int(counts.max())
    rank = torch.arange(tid.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[tid[order]]
    slot = torch.empty_like(tid)
    slot[order] = tid[order] * depth + rank  # (M,) matmul row of each (copy, tile) pair
    # pixel (i, j) of a region lies at block pixel (offset + (i, j)): tile and place in tile
    ys = offset[:, :1] + torch.arange(hr, device=dev)  # (B, hr)
    xs = offset[:, 1:] + torch.arange(wr, device=dev)  # (B, wr)
    copies = torch.arange(b, device=dev)[:, None]
    pair = (copies * nby + ys // ty)[:, :, None] * nbx + (xs // tx)[:, None, :]  # (B, hr, wr)
    within = ((ys % ty) * tx)[:, :, None] + (xs % tx)[:, None, :]
    dst = slot[pair] * (ty * tx) + within  # (B, hr, wr) pixel row of the padded matmul input
    padded = delta.new_zeros(((hi - lo) * depth * ty * tx, c))
    padded.index_copy_(0, dst.view(-1), delta.reshape(-1, c))
    out = torch.bmm(padded.view(hi - lo, depth, -1), weight[lo:hi])  # (tiles, depth, O)
    per_pair = out.view((hi - lo) * depth, -1).index_select(0, slot)  # (M, O)
    return per_pair.view(b, nby * nbx, -1).sum(dim=1)
