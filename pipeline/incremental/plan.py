"""Where each window changes each activation: receptive-field geometry of a window grid.

For every window the changed box is propagated through the trunk (a conv/pool maps input rows
``[lo, hi)`` to the outputs whose windows touch them; element-wise ops keep the box; a sum of
branches takes the union). Each activation then gets one region size, the largest changed box
of any window, so that all copies of a batch run through a layer in ONE call; a region is
shifted inwards at the border (same size, still inside the map) rather than clipped.

When a conv/pool is the only reader of its input and its crop (region plus halo) is not much
larger than the input's region, the input's region is grown to exactly that crop ("cover"): the
layer then reads the region as is, with no gather from the cache. This pays off after a conv
feeding a pool (the pool's crop is the conv's region rounded to the pool grid); elsewhere the
crop is cut from the cache and the region written into it ("merge").

With a threshold ``tau < 1`` (Krypton's projective-field thresholding, the approximate engine)
each changed box is capped after it is propagated: a side longer than ``floor(tau * side)`` of
its layer is cut to that length, centred on the window's centre projected onto that layer.
Activations outside the capped box keep their unoccluded values, so the change stops spreading
there; ``tau = 1`` caps nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.incremental.graph import Entry, Step
from pipeline.incremental.head import Tiles, make_tiles
from pipeline.kernel.geometry import WindowGrid

__all__ = ["Plan", "Region", "cap_side", "make_plan"]

_COVER_GROWTH = 1.35  # largest area growth of a region to save a merge (a gather + a write)


@dataclass(frozen=True)
class Region:
    """The recomputed part of one activation, for every window.

    Attributes:
        size: ``(h, w)``, the same for all windows.
        origin: ``(P, 2)`` int64 top-left per window; inside the activation, except the input
            region, which may reach into the zero padding of the first layer.
    """

    size: tuple[int, int]
    origin: torch.Tensor


@dataclass(frozen=True)
class Plan:
    """Everything about one window grid that does not depend on the images.

    Attributes:
        boxes: ``(P, 6)`` window boxes ``[c0, c1, y0, y1, x0, x1]``.
        regions: region of every trunk node.
        covered: ``(step, input)`` edges where the input's region is exactly the step's crop.
        merges: ``(step, input)`` edges where the crop is cut from the cache and the input's
            region written in (window steps not covered; element-wise steps whose input
            region differs from theirs).
        contained: merge edges where every window's input region lies inside its crop.
        window: ``(h, w)`` of every window when none is clipped at the border and all span
            every channel, else None.
        tiles: tiling of every ``"linear"`` entry.
    """

    boxes: torch.Tensor
    regions: dict[str, Region]
    covered: frozenset[tuple[str, str]]
    merges: frozenset[tuple[str, str]]
    contained: frozenset[tuple[str, str]]
    window: tuple[int, int] | None
    tiles: dict[str, Tiles]


def cap_side(threshold: float, side: int) -> int:
    """Longest side of a changed box along an axis of ``side`` activations under threshold
    ``tau``: ``floor(tau * side)``, at least 1 (``side`` itself for ``tau = 1``)."""
    return max(1, min(side, int(threshold * side + 1e-9)))


def _cap(
    box: torch.Tensor, centre: torch.Tensor, shape: tuple[int, int, int], threshold: float
) -> torch.Tensor:
    """``(P, 4)`` boxes with every side longer than :func:`cap_side` cut to that length around
    the window's projected centre ``(P, 2)`` (continuous coordinates), kept inside the box.

    The projected centre, not the box's middle: a box clipped at the map's edge is off-centre,
    and cutting around its middle would drop the rows next to the window, where the change is
    largest.
    """
    out = box.clone()
    for axis, dim in ((0, shape[1]), (1, shape[2])):
        cap = cap_side(threshold, dim)
        lo, hi = box[:, 2 * axis], box[:, 2 * axis + 1]
        start = torch.floor(centre[:, axis] - cap / 2 + 0.5).to(torch.int64)
        start = torch.minimum(torch.maximum(start, lo), hi - cap)
        over = hi - lo > cap
        out[:, 2 * axis] = torch.where(over, start, lo)
        out[:, 2 * axis + 1] = torch.where(over, start + cap, hi)
    return out


def _changed_boxes(
    steps: list[Step], grid: WindowGrid, threshold: float = 1.0
) -> dict[str, torch.Tensor]:
    """``(P, 4)`` changed box ``[y0, y1, x0, x1)`` of every trunk node, for every window; every
    node but the input (the window itself) capped at ``threshold`` (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    centres: dict[str, torch.Tensor] = {}  # (P, 2) window centre projected onto each node
    for st in steps:
        if st.kind == "input":
            out[st.name] = grid.boxes()[:, 2:]
            b = out[st.name].double()
            centres[st.name] = torch.stack([b[:, 0] + b[:, 1], b[:, 2] + b[:, 3]], dim=1) / 2
            continue
        if st.kind == "window" and st.axes is not None:
            src, c = out[st.inputs[0]], centres[st.inputs[0]]
            y0, y1 = st.axes[0].out_box(src[:, 0], src[:, 1], st.shape[1])
            x0, x1 = st.axes[1].out_box(src[:, 2], src[:, 3], st.shape[2])
            box = torch.stack([y0, y1, x0, x1], dim=1)
            centre = torch.stack([ax.out_centre(c[:, j]) for j, ax in enumerate(st.axes)], 1)
        else:
            b = torch.stack([out[u] for u in st.inputs])  # (inputs, P, 4)
            lo, hi = b[..., 0::2].amin(dim=0), b[..., 1::2].amax(dim=0)  # union
            box = torch.stack([lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1]], dim=1)
            centre = torch.stack([centres[u] for u in st.inputs]).mean(dim=0)
        centres[st.name] = centre
        out[st.name] = box if threshold >= 1.0 else _cap(box, centre, st.shape, threshold)
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


def _crop_box(st: Step, region: Region) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(P, 2)`` start and ``(h, w)`` of the input crop a window step reads for its region."""
    assert st.axes is not None
    parts = [ax.crop(region.origin[:, j], region.size[j]) for j, ax in enumerate(st.axes)]
    return torch.stack([parts[0][0], parts[1][0]], dim=1), (parts[0][1], parts[1][1])


def _regions(
    steps: list[Step], boxes: dict[str, torch.Tensor], readers: dict[str, int]
) -> tuple[dict[str, Region], set[tuple[str, str]]]:
    """Regions of all trunk nodes, growing single-reader inputs to their reader's crop where
    that is cheap (see the module docstring); also returns the covered edges."""
    by_name = {st.name: st for st in steps}
    regions: dict[str, Region] = {}
    covered: set[tuple[str, str]] = set()
    for st in reversed(steps):  # readers first: a region may be grown by its reader
        regions.setdefault(st.name, _region(boxes[st.name], st.shape))
        if st.kind != "window" or readers[st.inputs[0]] != 1:
            continue
        u = by_name[st.inputs[0]]
        start, size = _crop_box(st, regions[st.name])
        inside = bool((start >= 0).all()) and all(
            int(start[:, j].max()) + size[j] <= u.shape[j + 1] for j in range(2)
        )
        default = _region(boxes[u.name], u.shape).size
        cheap = size[0] * size[1] <= _COVER_GROWTH * default[0] * default[1]
        # The input region is built by a gather anyway: covering saves the merge even when it
        # reaches into the first layer's zero padding.
        if (u.kind == "input" and st.pad_value == 0.0) or (inside and cheap):
            regions[u.name] = Region(size, start)
            covered.add((st.name, u.name))
            while (
                inside
                and u.kind == "pointwise"
                and len(u.inputs) == 1
                and readers[u.inputs[0]] == 1
            ):
                u = by_name[u.inputs[0]]
                regions[u.name] = Region(size, start)  # element-wise: same region as reader
    return regions, covered


def _merge_edges(
    steps: list[Step], regions: dict[str, Region], covered: set[tuple[str, str]]
) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """Edges whose reader merges the input region into a crop of the cache, and those of them
    where every window's region lies inside its crop. A window step whose crop is exactly its
    input's region for every window is added to ``covered`` instead (it reads the region as
    is): a 1x1 conv reading a node that has other readers too, as the first conv of a
    bottleneck block does, would otherwise cut a crop from the cache only to overwrite all of
    it, on the widest activations of the net."""
    merges, contained = set(), set()
    for st in steps:
        for u in st.inputs:
            if st.kind == "window":
                if (st.name, u) in covered:
                    continue
                start, size = _crop_box(st, regions[st.name])
            else:
                start, size = regions[st.name].origin, regions[st.name].size
            if regions[u].size == size and torch.equal(regions[u].origin, start):
                if st.kind == "window":
                    covered.add((st.name, u))
                continue
            merges.add((st.name, u))
            rel = regions[u].origin - start  # (P, 2) region origin within the crop
            ends = [int(rel[:, j].max()) + regions[u].size[j] for j in range(2)]
            if bool((rel >= 0).all()) and ends[0] <= size[0] and ends[1] <= size[1]:
                contained.add((st.name, u))
    return merges, contained


def _uniform_window(grid: WindowGrid, region: Region) -> tuple[int, int] | None:
    """The window size when every window has it (none clipped), spans every channel and lies
    inside the input region."""
    b = grid.boxes()
    sizes = torch.stack([b[:, 3] - b[:, 2], b[:, 5] - b[:, 4]], dim=1)  # (P, 2)
    full = bool(((b[:, 0] == 0) & (b[:, 1] == grid.image[0])).all())
    rel = b[:, 2::2] - region.origin  # (P, 2) window origin in the region
    ends = rel + sizes
    inside = bool((rel >= 0).all()) and all(int(ends[:, j].max()) <= region.size[j] for j in (0, 1))
    if not (full and inside and bool((sizes == sizes[0]).all())):
        return None
    return (int(sizes[0, 0]), int(sizes[0, 1]))


def make_plan(
    steps: list[Step],
    entries: dict[str, Entry],
    head_reads: set[str],
    grid: WindowGrid,
    device: torch.device,
    threshold: float = 1.0,
) -> Plan:
    """Regions, crops and head tilings of every node for the windows of ``grid``.

    Args:
        steps: the trunk, in order.
        entries: incrementally updated head nodes.
        head_reads: spatial nodes the head reads (entry sources and spliced nodes).
        grid: the windows.
        device: where the plan's index tensors live.
        threshold: tau in (0, 1], the cap on each changed box's side as a fraction of its
            layer's side (1: exact; see the module docstring).
    """
    readers = {st.name: int(st.name in head_reads) for st in steps}
    for st in steps:
        for u in st.inputs:
            readers[u] += 1
    boxes = _changed_boxes(steps, grid, threshold)
    regions, covered = _regions(steps, boxes, readers)
    merges, contained = _merge_edges(steps, regions, covered)
    by_name = {st.name: st for st in steps}
    tiles = {
        e.name: make_tiles(
            e, by_name[e.source].shape, regions[e.source].size, regions[e.source].origin, device
        )
        for e in entries.values()
        if e.kind == "linear"
    }
    return Plan(
        boxes=grid.boxes().to(device),
        regions={k: Region(r.size, r.origin.to(device)) for k, r in regions.items()},
        covered=frozenset(covered),
        merges=frozenset(merges),
        contained=frozenset(contained),
        window=_uniform_window(grid, regions[steps[0].name]),
        tiles=tiles,
    )
