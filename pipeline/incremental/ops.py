"""Batched tensor primitives of incremental inference: cut crops, splice regions, update heads.

Activations are cached channels-last (``(N, H, W, C)``, padded per consumer) so that one
``index_select`` of pixel rows cuts a crop for every copy of a batch at once, whatever its
position, and one ``index_copy_`` writes every copy's region into its crop: no Python loop runs
per copy. A *region* is the recomputed part of one activation for each copy: a
``(B, C, h, w)`` tensor (one ``(h, w)`` per node, the largest changed box of any window) at a
per-copy origin ``(B, 2)``; outside it the activation equals the cached unoccluded one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

__all__ = [
    "Padded",
    "gather_crop",
    "input_region",
    "merge",
    "run_node",
    "slice_max_pool",
    "splice",
]


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


def gather_crop(
    cache: Padded,
    img: torch.Tensor,
    start: torch.Tensor,
    size: tuple[int, int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cached values of each copy's image over ``[start, start + size)``.

    Args:
        cache: the padded activations.
        img: ``(B,)`` image of each copy.
        start: ``(B, 2)`` top-left of each crop (``>= -padding``).
        size: ``(h, w)``.
        out: optional contiguous buffer of ``B * h * w * C`` elements in the cache's dtype.

    Returns:
        ``(B, h, w, C)`` contiguous.
    """
    h, w = size
    n, hp, wp, c = cache.data.shape
    # Every pixel starts a row of w * C contiguous floats, so one index_select (a memcpy per
    # crop row) cuts all crops; advanced indexing over (B, h, w) is several times slower.
    rows = cache.data.as_strided((n * hp * wp - w + 1, w * c), (c, 1))
    y = img * hp + start[:, 0] + cache.top  # (B,)
    first = (y[:, None] + torch.arange(h, device=img.device)) * wp + start[:, 1:] + cache.left
    if out is None:
        return rows.index_select(0, first.reshape(-1)).view(-1, h, w, c)
    torch.index_select(rows, 0, first.reshape(-1), out=out.view(-1, w * c))
    return out.view(-1, h, w, c)


def _flat_pixels(rows: torch.Tensor, cols: torch.Tensor, width: int) -> torch.Tensor:
    """``(B, h, w)`` index of pixel ``(rows[b, i], cols[b, j])`` of copy ``b`` in a
    ``(B, height, width)`` grid flattened copy-major; ``rows`` ``(B, h)``, ``cols`` ``(B, w)``
    (absolute row ``b * height + y`` already folded into ``rows``)."""
    return rows[:, :, None] * width + cols[:, None, :]


def merge(
    cache: Padded,
    region: torch.Tensor,
    region_origin: torch.Tensor,
    img: torch.Tensor,
    start: torch.Tensor,
    size: tuple[int, int],
    contained: bool = False,
) -> torch.Tensor:
    """The occluded activation of each copy over a crop: the cache, with the region written in.

    Args:
        cache: unoccluded activations.
        region: ``(B, C, hr, wr)`` recomputed values of each copy.
        region_origin: ``(B, 2)`` top-left of each copy's region.
        img: ``(B,)`` image of each copy.
        start: ``(B, 2)`` top-left of each crop (may reach into the padding); ``size``: ``(h, w)``.
        contained: every region lies inside its crop (then no masking is needed).

    Returns:
        ``(B, C, h, w)`` in channels-last memory.
    """
    b, c, hr, wr = region.shape
    h, w = size
    dev = img.device
    # one spare row at the end takes the region pixels that fall outside their crop
    out = torch.empty((b * h * w + 1, c), dtype=region.dtype, device=dev)
    if cache.data.dtype == region.dtype:
        gather_crop(cache, img, start, size, out=out[:-1])
    else:
        out[:-1] = gather_crop(cache, img, start, size).view(-1, c)
    ys = region_origin[:, :1] + torch.arange(hr, device=dev) - start[:, :1]  # (B, hr) in crop
    xs = region_origin[:, 1:] + torch.arange(wr, device=dev) - start[:, 1:]  # (B, wr)
    copies = torch.arange(b, device=dev)[:, None]
    dst = _flat_pixels(copies * h + ys, xs, w)  # (B, hr, wr) crop pixel of each region pixel
    if not contained:
        inside = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]
        dst.masked_fill_(~inside, b * h * w)
    out.index_copy_(0, dst.view(-1), region.permute(0, 2, 3, 1).reshape(-1, c))
    return out[:-1].view(b, h, w, c).permute(0, 3, 1, 2)


def splice(
    cache: Padded, region: torch.Tensor, region_origin: torch.Tensor, img: torch.Tensor
) -> torch.Tensor:
    """The full occluded activation ``(B, C, H, W)``: the cache of each copy's image with its
    region written in (for head ops that need the whole map)."""
    start = torch.zeros_like(region_origin)
    return merge(cache, region, region_origin, img, start, cache.size, contained=True)


def input_region(
    cache: Padded,
    fill: torch.Tensor,
    boxes: torch.Tensor,
    img: torch.Tensor,
    draw: torch.Tensor,
    origin: torch.Tensor,
    size: tuple[int, int],
    window: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Occluded pixels of each copy over its input region.

    Args:
        cache: the unoccluded images, zero-padded.
        fill: ``(N, K, C)`` colour fills or ``(N, K, H, W, C)`` per-pixel fills.
        boxes: ``(B, 6)`` window ``[c0, c1, y0, y1, x0, x1]`` of each copy.
        img, draw: ``(B,)`` image and draw of each copy.
        origin: ``(B, 2)`` top-left of the region (may reach into the padding, which stays 0);
            ``size``: its ``(h, w)``.
        window: ``(h, w)`` of every window when none is clipped and all span every channel:
            the fill is then written in with one ``index_copy_`` instead of a masked select.

    Returns:
        ``(B, C, h, w)``: ``fill[img, draw]`` inside the window, the image elsewhere (the same
        values the full kernel's ``torch.where`` gives, bitwise).
    """
    h, w = size
    dev = img.device
    pix = gather_crop(cache, img, origin, size)  # (B, h, w, C), a fresh buffer
    b, c = pix.shape[0], pix.shape[-1]
    if window is not None:
        ys = boxes[:, 2:3] - origin[:, :1] + torch.arange(window[0], device=dev)  # (B, wh)
        xs = boxes[:, 4:5] - origin[:, 1:] + torch.arange(window[1], device=dev)  # (B, ww)
        dst = _flat_pixels(torch.arange(b, device=dev)[:, None] * h + ys, xs, w)
        if fill.dim() == 3:
            src = fill[img, draw][:, None, None, :].expand(b, *window, c)
        else:
            n, k = fill.shape[:2]
            flat = Padded(fill.view(n * k, *fill.shape[2:]), 0, 0, (fill.shape[2], fill.shape[3]))
            src = gather_crop(flat, img * k + draw, boxes[:, 2::2], window)
        pix.view(-1, c).index_copy_(0, dst.view(-1), src.reshape(-1, c))
        return pix.permute(0, 3, 1, 2)
    ys = origin[:, :1] + torch.arange(h, device=dev)  # (B, h)
    xs = origin[:, 1:] + torch.arange(w, device=dev)  # (B, w)
    if fill.dim() == 3:
        f = fill[img, draw][:, None, None, :]  # (B, 1, 1, C)
    else:  # padding positions are never inside a window: clamp them to any valid pixel
        yc, xc = ys.clamp(0, fill.shape[2] - 1), xs.clamp(0, fill.shape[3] - 1)
        f = fill[img[:, None, None], draw[:, None, None], yc[:, :, None], xc[:, None, :]]
    rows = (ys >= boxes[:, 2:3]) & (ys < boxes[:, 3:4])  # (B, h)
    cols = (xs >= boxes[:, 4:5]) & (xs < boxes[:, 5:6])  # (B, w)
    mask = (rows[:, :, None] & cols[:, None, :])[..., None]  # (B, h, w, 1)
    chan = torch.arange(c, device=dev)
    mask = mask & ((chan >= boxes[:, 0:1]) & (chan < boxes[:, 1:2]))[:, None, None, :]
    return torch.where(mask, f, pix).permute(0, 3, 1, 2)


def slice_max_pool(
    x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> torch.Tensor:
    """Max pooling without padding as a running ``torch.maximum`` over strided slices.

    Equal to ``F.max_pool2d`` (a max is exact in any order), but the CPU kernel of
    ``max_pool2d`` also writes int64 argmax indices, several times the traffic of the output.

    Args:
        x: ``(B, C, h, w)``.

    Returns:
        ``(B, C, (h - ext_h) // s_h + 1, (w - ext_w) // s_w + 1)``.
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    ho = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    parts = [
        x[:, :, i * dh : i * dh + (ho - 1) * sh + 1 : sh, j * dw : j * dw + (wo - 1) * sw + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]
    if len(parts) == 1:
        return parts[0].clone()
    out = torch.maximum(parts[0], parts[1])
    for part in parts[2:]:
        torch.maximum(out, part, out=out)
    return out
