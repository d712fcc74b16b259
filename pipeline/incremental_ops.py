"""Batched tensor primitives of incremental inference: cut crops, splice regions, update heads.

Activations are cached channels-last (``(N, H, W, C)``, padded per consumer) so that one
advanced-indexing gather cuts a crop for every copy of a batch at once, whatever its position:
no Python loop runs per copy. A *region* is the recomputed part of one activation for each copy:
a ``(B, C, h, w)`` tensor (one ``(h, w)`` per node, the largest changed box of any window) at a
per-copy origin ``(B, 2)``; outside it the activation equals the cached unoccluded one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

__all__ = ["Padded", "crop", "input_region", "linear_update", "run_node", "splice"]


@dataclass(frozen=True)
class Padded:
    """A cached activation, channels-last and padded.

    Attributes:
        data: ``(N, top + H + bottom, left + W + right, C)``.
        top: rows of padding above row 0.
        left: columns of padding left of column 0.
        size: ``(H, W)`` of the unpadded activation.
    """

    data: torch.Tensor
    top: int
    left: int
    size: tuple[int, int]


def run_node(
    node: fx.Node, env: dict[str, Any], modules: dict[str, nn.Module], gm: nn.Module
) -> Any:
    """Evaluate one fx node on the values in ``env``; in-place ops run out of place, because a
    region may be read by several consumers."""
    args = fx.node.map_arg(node.args, lambda n: env[n.name])
    kwargs = dict(fx.node.map_arg(node.kwargs, lambda n: env[n.name]))
    if node.op == "get_attr":
        return _attr(gm, str(node.target))
    if node.op == "call_module":
        return modules[str(node.target)](*args, **kwargs)
    if kwargs.get("inplace") is True:
        kwargs["inplace"] = False
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    name = str(node.target)
    if name.endswith("_") and not name.endswith("__") and hasattr(torch.Tensor, name[:-1]):
        name = name[:-1]
    return getattr(args[0], name)(*args[1:], **kwargs)


def _attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _gather(src: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
    """``src[idx, rows, cols]`` per copy: ``(M, Hs, Ws, C)``, ``(B,)``, ``(B, h)``, ``(B, w)``
    -> ``(B, h, w, C)``."""
    return src[idx[:, None, None], rows[:, :, None], cols[:, None, :]]


def crop(
    cache: Padded,
    region: torch.Tensor | None,
    region_origin: torch.Tensor | None,
    img: torch.Tensor,
    start: torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    """The occluded activation of each copy over ``[start, start + size)``.

    Args:
        cache: the unoccluded activation of every image.
        region: ``(B, C, hr, wr)`` recomputed values of each copy, or None for the cached ones.
        region_origin: ``(B, 2)`` top-left of ``region`` (activation pixels).
        img: ``(B,)`` image of each copy.
        start: ``(B, 2)`` top-left of the crop; may reach into the padding.
        size: ``(h, w)`` of the crop.

    Returns:
        ``(B, C, h, w)`` (channels-last memory): the region where it overlaps the crop, the
        cache elsewhere.
    """
    h, w = size
    ar_h = torch.arange(h, device=start.device)
    ar_w = torch.arange(w, device=start.device)
    ys, xs = start[:, :1] + ar_h, start[:, 1:] + ar_w  # (B, h), (B, w)
    out = _gather(cache.data, img, ys + cache.top, xs + cache.left)  # (B, h, w, C)
    if region is not None and region_origin is not None:
        hr, wr = region.shape[2:]
        ry, rx = ys - region_origin[:, :1], xs - region_origin[:, 1:]
        inside = ((ry >= 0) & (ry < hr))[:, :, None] & ((rx >= 0) & (rx < wr))[:, None, :]
        copies = torch.arange(region.shape[0], device=start.device)
        new = _gather(region.permute(0, 2, 3, 1), copies, ry.clamp(0, hr - 1), rx.clamp(0, wr - 1))
        out = torch.where(inside[..., None], new, out)
    return out.permute(0, 3, 1, 2)


def splice(
    cache: Padded, region: torch.Tensor, region_origin: torch.Tensor, img: torch.Tensor
) -> torch.Tensor:
    """The full occluded activation ``(B, C, H, W)``: the cache of each copy's image with its
    region written in (for head ops that need the whole map)."""
    h, w = cache.size
    full = cache.data[:, cache.top : cache.top + h, cache.left : cache.left + w][img]  # (B,H,W,C)
    hr, wr = region.shape[2:]
    dev = img.device
    ys = region_origin[:, :1] + torch.arange(hr, device=dev)  # (B, hr)
    xs = region_origin[:, 1:] + torch.arange(wr, device=dev)  # (B, wr)
    copies = torch.arange(img.shape[0], device=dev)
    full[copies[:, None, None], ys[:, :, None], xs[:, None, :]] = region.permute(0, 2, 3, 1).to(
        full.dtype
    )
    return full.permute(0, 3, 1, 2)


def input_region(
    cache: Padded,
    fill: torch.Tensor,
    boxes: torch.Tensor,
    img: torch.Tensor,
    draw: torch.Tensor,
    origin: torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    """Occluded pixels of each copy over its input region.

    Args:
        cache: the unoccluded images (``pad`` 0 entry of the input).
        fill: ``(N, K, C, 1|H, 1|W)`` baseline fill.
        boxes: ``(B, 6)`` window ``[c0, c1, y0, y1, x0, x1]`` of each copy.
        img, draw: ``(B,)`` image and draw of each copy.
        origin: ``(B, 2)`` top-left of the region; ``size``: its ``(h, w)``.

    Returns:
        ``(B, C, h, w)``: ``fill[img, draw]`` inside the window, the image elsewhere (the same
        ``torch.where`` the full kernel applies, so values are bitwise equal).
    """
    h, w = size
    dev = img.device
    ys = origin[:, :1] + torch.arange(h, device=dev)  # (B, h)
    xs = origin[:, 1:] + torch.arange(w, device=dev)  # (B, w)
    pix = _gather(cache.data, img, ys + cache.top, xs + cache.left)  # (B, h, w, C)
    if fill.shape[-1] == 1 and fill.shape[-2] == 1:
        f = fill[img, draw, :, 0, 0][:, None, None, :]  # (B, 1, 1, C)
    else:
        f = fill.permute(0, 1, 3, 4, 2)[img[:, None, None], draw[:, None, None], ys[:, :, None],
                                        xs[:, None, :]]  # (B, h, w, C) # fmt: skip
    chan = torch.arange(pix.shape[-1], device=dev)
    mask = (
        ((ys >= boxes[:, 2:3]) & (ys < boxes[:, 3:4]))[:, :, None, None]
        & ((xs >= boxes[:, 4:5]) & (xs < boxes[:, 5:6]))[:, None, :, None]
        & ((chan >= boxes[:, 0:1]) & (chan < boxes[:, 1:2]))[:, None, None, :]
    )  # (B, h, w, C)
    return torch.where(mask, f, pix).permute(0, 3, 1, 2)


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
    ``blocks`` tiles, and the products are grouped by tile so that every tile's weights are
    multiplied once per batch (a compute-bound matmul instead of one matrix-vector product per
    copy).

    Args:
        delta: ``(B, C, hr, wr)`` change of the region of each copy.
        offset: ``(B, 2)`` region origin relative to the first pixel of its block.
        first: ``(B, 2)`` tile index (row, col) of each copy's block.
        weight: ``(tiles, C * ty * tx, O)`` the Linear's weights, tile by tile.
        tile: ``(ty, tx)`` in activation pixels; ``blocks``: ``(nby, nbx)`` tiles per copy.
        n_tiles_x: tiles per row of the activation.

    Returns:
        ``(B, O)`` change of the Linear's output.
    """
    b, c, hr, wr = delta.shape
    (ty, tx), (nby, nbx) = tile, blocks
    dev = delta.device
    block = delta.new_zeros((b, nby * ty, nbx * tx, c))
    ys = offset[:, :1] + torch.arange(hr, device=dev)  # (B, hr)
    xs = offset[:, 1:] + torch.arange(wr, device=dev)  # (B, wr)
    copies = torch.arange(b, device=dev)
    block[copies[:, None, None], ys[:, :, None], xs[:, None, :]] = delta.permute(0, 2, 3, 1)
    pieces = block.view(b, nby, ty, nbx, tx, c).permute(0, 1, 3, 5, 2, 4).reshape(-1, c * ty * tx)
    rows = first[:, :1] + torch.arange(nby, device=dev)  # (B, nby)
    cols = first[:, 1:] + torch.arange(nbx, device=dev)  # (B, nbx)
    tid = (rows[:, :, None] * n_tiles_x + cols[:, None, :]).reshape(-1)  # (B * nby * nbx,)
    order = torch.argsort(tid, stable=True)
    counts = torch.bincount(tid, minlength=weight.shape[0]).tolist()
    sorted_pieces = pieces[order]  # (M, C * ty * tx), grouped by tile
    out = delta.new_empty((sorted_pieces.shape[0], weight.shape[2]))
    start = 0
    # One matmul per tile present in the batch (at most tiles, not copies).
    for t, n in enumerate(counts):
        if n:
            torch.mm(sorted_pieces[start : start + n], weight[t], out=out[start : start + n])
            start += n
    owner = copies.repeat_interleave(nby * nbx)[order]  # (M,) copy of each product
    return delta.new_zeros((b, weight.shape[2])).index_add_(0, owner, out)
