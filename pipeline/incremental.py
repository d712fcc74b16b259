"""Exact incremental inference of occluded copies for convolutional models (Krypton).

An occluding window changes each feature map only inside the window's projective field; outside
it every activation equals the unoccluded pass. The engine runs each image once, caches every
trunk activation, and for a batch of occluded copies computes each layer only on the changed
region (plus the halo its kernel reads), splices it into the cache, and updates the head from
the change alone: ``y = y0 + W[:, changed] @ (a_new - a_old)[changed]`` for flatten + Linear,
``mean = mean0 + (sum(new) - sum(old)) / HW`` for global average pooling (Nakandala, Kumar and
Papakonstantinou, "Incremental and Approximate Inference for Faster Occlusion-based Deep CNN
Explanations", SIGMOD 2019). The results equal full forward passes up to float rounding.

Example:
    >>> from pipeline.nets import SeedCNN
    >>> net = SeedCNN(num_classes=2, input_dim=32).eval()
    >>> x = torch.rand(2, 3, 32, 32)
    >>> engine, reason = auto_engine(net, x.shape[1:], x.device)
    >>> r = attribute(net, x, window=[8, 8], stride=[4, 4], engine=engine)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from pipeline.geometry import WindowGrid
from pipeline.incremental_graph import Traced, trace_model
from pipeline.incremental_ops import Padded, crop, input_region, linear_update, run_node, splice
from pipeline.incremental_plan import Plan, make_plan

__all__ = ["IncrementalEngine", "auto_engine"]

_CACHE_CHUNK = 8  # images per unoccluded pass when filling the cache (bounds its peak memory)


@dataclass
class _Cache:
    """Unoccluded activations of the images of one ``attribute()`` call."""

    key: tuple[Any, ...]
    act: dict[tuple[str, float], Padded]  # (node, pad value) -> padded channels-last activation
    base: dict[str, torch.Tensor]  # entry node -> (N, ...) unoccluded value


def _tensor_key(x: torch.Tensor) -> tuple[Any, ...]:
    try:
        version = x._version
    except RuntimeError:  # inference tensors have no version counter
        version = -1
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device, version)


class IncrementalEngine:
    """Occluded outputs of a convolutional model from its cached unoccluded activations.

    Build it with :meth:`build` or :func:`auto_engine` (None for models it cannot run), then
    pass it as ``attribute(..., engine=engine)``.
    """

    name = "incremental"

    def __init__(self, traced: Traced, image_shape: tuple[int, int, int]) -> None:
        self.traced = traced
        self.image_shape = image_shape
        self._steps = {st.name: st for st in traced.steps}
        self._input = traced.steps[0].name
        self._output = next(n for n in traced.gm.graph.nodes if n.op == "output")
        self._head, splices = self._demanded()
        self._pads = self._padding(splices)
        self._last = self._last_uses(splices)
        self._plans: dict[tuple[WindowGrid, torch.device], Plan] = {}
        self._cache: _Cache | None = None

    @classmethod
    def build_or_reason(
        cls, model: Any, image_shape: Sequence[int], device: torch.device | str
    ) -> tuple[IncrementalEngine | None, str]:
        """An engine for ``model`` on ``(C, H, W)`` images, or None and why not.

        Returns:
            ``(engine, "")`` or ``(None, reason)``, e.g. ``"unsupported op: function softmax
            (node 'softmax') reads the spatial tensor 'conv1'"``.
        """
        shape = (int(image_shape[0]), int(image_shape[1]), int(image_shape[2]))
        with torch.no_grad():
            traced = trace_model(model, shape, torch.device(device))
        if isinstance(traced, str):
            return None, traced
        return cls(traced, shape), ""

    @classmethod
    def build(
        cls, model: Any, image_shape: Sequence[int], device: torch.device | str
    ) -> IncrementalEngine | None:
        """An engine for ``model``, or None when it cannot run incrementally (see
        :meth:`build_or_reason` for the reason)."""
        return cls.build_or_reason(model, image_shape, device)[0]

    # ---- static analysis -------------------------------------------------------------------

    def _demanded(self) -> tuple[list[fx.Node], set[str]]:
        """Head nodes to evaluate per batch (in order), and spatial nodes they need in full."""
        t = self.traced
        need: set[str] = set()
        splices: set[str] = set()
        todo = list(self._output.all_input_nodes)
        while todo:
            n = todo.pop()
            if n.name in need or n.name in t.consts:
                continue
            if n.name in self._steps:
                splices.add(n.name)
            elif n.name in t.entries:
                need.add(n.name)  # its value comes from the incremental update
            else:
                need.add(n.name)
                todo.extend(n.all_input_nodes)
        head = [n for n in t.head if n.name in need and n.name not in t.entries]
        return head, splices

    def _padding(self, splices: set[str]) -> dict[str, dict[float, list[int]]]:
        """Padding ``[top, bottom, left, right]`` of every cached activation, per pad value."""
        pads: dict[str, dict[float, list[int]]] = {}

        def need(name: str, value: float, amounts: Sequence[int] = (0, 0, 0, 0)) -> None:
            cur = pads.setdefault(name, {}).setdefault(value, [0, 0, 0, 0])
            cur[:] = [max(a, b) for a, b in zip(cur, amounts, strict=True)]

        need(self._input, 0.0)
        for st in self.traced.steps:
            if st.kind == "window" and st.axes is not None:
                src = self._steps[st.inputs[0]].shape
                amounts = []
                for ax, n_out, n_in in zip(st.axes, st.shape[1:], src[1:], strict=True):
                    end = (n_out - 1) * ax.stride - ax.pad + ax.extent  # last input read + 1
                    amounts += [ax.pad, max(0, end - n_in)]
                need(st.inputs[0], st.pad_value, amounts)
            elif st.kind == "pointwise" and len(st.inputs) > 1:
                for u in st.inputs:
                    need(u, 0.0)
        for e in self.traced.entries.values():
            need(e.source, 0.0)
        for name in splices:
            need(name, 0.0)
        return pads

    def _last_uses(self, splices: set[str]) -> dict[str, int]:
        """Index of the last trunk step reading each region (past the end when the head does),
        so regions are freed as soon as possible."""
        last: dict[str, int] = {}
        for i, st in enumerate(self.traced.steps):
            for u in st.inputs:
                last[u] = i
        for name in splices | {e.source for e in self.traced.entries.values()}:
            last[name] = len(self.traced.steps)
        return last

    # ---- caches ----------------------------------------------------------------------------

    def _plan(self, grid: WindowGrid, device: torch.device) -> Plan:
        if grid.image != self.image_shape:
            raise ValueError(
                f"this engine was built for images of shape {self.image_shape}, got windows over "
                f"{grid.image}; build one per image size"
            )
        key = (grid, device)
        if key not in self._plans:
            self._plans[key] = make_plan(self.traced.steps, self.traced.entries, grid, device)
        return self._plans[key]

    def _activations(self, x: torch.Tensor) -> _Cache:
        """Cached unoccluded activations of ``x``, recomputed when ``x`` changes."""
        key = _tensor_key(x)
        if self._cache is not None and self._cache.key == key:
            return self._cache
        self._cache = None  # free the old cache before filling the new one
        t = self.traced
        parts: dict[tuple[str, float], list[torch.Tensor]] = {}
        bases: dict[str, list[torch.Tensor]] = {}
        for i in range(0, x.shape[0], _CACHE_CHUNK):
            env: dict[str, Any] = dict(t.consts)
            env[self._input] = x[i : i + _CACHE_CHUNK]
            self._store(self._input, env, parts, bases)
            for node in t.gm.graph.nodes:
                if node.op in ("placeholder", "output") or node.name in t.consts:
                    continue
                env[node.name] = run_node(node, env, t.modules, t.gm)
                self._store(node.name, env, parts, bases)
        act = {}
        for (name, value), chunks in parts.items():
            top, _, left, _ = self._pads[name][value]
            _, h, w = self._steps[name].shape
            act[(name, value)] = Padded(torch.cat(chunks), top, left, (h, w))
        self._cache = _Cache(key, act, {k: torch.cat(v) for k, v in bases.items()})
        return self._cache

    def _store(self, name: str, env: dict[str, Any], parts: dict, bases: dict) -> None:
        for value, (top, bottom, left, right) in self._pads.get(name, {}).items():
            padded = F.pad(env[name], (left, right, top, bottom), value=value)
            parts.setdefault((name, value), []).append(padded.permute(0, 2, 3, 1).contiguous())
        if name in self.traced.entries:
            bases.setdefault(name, []).append(env[name])

    # ---- occluded batches ------------------------------------------------------------------

    @torch.inference_mode()
    def forward_occluded(
        self,
        x: torch.Tensor,
        fill: torch.Tensor,
        grid: WindowGrid,
        img: torch.Tensor,
        draw: torch.Tensor,
        win: torch.Tensor,
    ) -> torch.Tensor:
        """Raw model outputs of occluded copies, as ``model(occluded_copy)`` would return them.

        Args:
            x: ``(N, C, H, W)`` unoccluded images (activations are cached per tensor).
            fill: ``(N, K, C, 1|H, 1|W)`` baseline fill of every image and draw.
            grid: the window geometry.
            img, draw, win: ``(B,)`` int64 image, draw and window of each copy.

        Returns:
            ``(B, ...)`` outputs of image ``img`` with window ``win`` filled from
            ``fill[img, draw]``.
        """
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"this engine was built for images of shape {self.image_shape}, got "
                f"{tuple(x.shape[1:])}; build one per image size"
            )
        cache = self._activations(x)
        plan = self._plan(grid, x.device)
        regions = self._trunk(cache, plan, fill, img, draw, win)
        return self._finish(cache, plan, regions, img, win)

    def _trunk(
        self,
        cache: _Cache,
        plan: Plan,
        fill: torch.Tensor,
        img: torch.Tensor,
        draw: torch.Tensor,
        win: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Region ``(B, C, h, w)`` of every trunk node still needed by the head."""
        t = self.traced
        regions: dict[str, torch.Tensor] = {}
        origin = {name: r.origin[win] for name, r in plan.regions.items()}  # (B, 2) each
        for i, st in enumerate(t.steps):
            size = plan.regions[st.name].size
            if st.kind == "input":
                src = cache.act[(st.name, 0.0)]
                value = input_region(src, fill, plan.boxes[win], img, draw, origin[st.name], size)
            elif st.kind == "window" and st.axes is not None and st.op is not None:
                u = st.inputs[0]
                (y, hy), (xx, wx) = (
                    ax.crop(origin[st.name][:, j], size[j]) for j, ax in enumerate(st.axes)
                )
                start = torch.stack([y, xx], dim=1)
                src = cache.act[(u, st.pad_value)]
                value = st.op(crop(src, regions[u], origin[u], img, start, (hy, wx)))
            else:
                env: dict[str, Any] = dict(t.consts)
                for u in st.inputs:
                    if (st.name, u) in plan.crops:
                        src = cache.act[(u, 0.0)]
                        env[u] = crop(src, regions[u], origin[u], img, origin[st.name], size)
                    else:
                        env[u] = regions[u]
                value = run_node(st.node, env, t.modules, t.gm)
            regions[st.name] = value
            for u in st.inputs:
                if self._last.get(u) == i:
                    del regions[u]
        return regions

    def _finish(
        self,
        cache: _Cache,
        plan: Plan,
        regions: dict[str, torch.Tensor],
        img: torch.Tensor,
        win: torch.Tensor,
    ) -> torch.Tensor:
        """Head outputs: incremental entries, then the remaining head ops on full tensors."""
        t = self.traced
        env: dict[str, Any] = dict(t.consts)
        for e in t.entries.values():
            reg, org = regions[e.source], plan.regions[e.source].origin[win]
            old = crop(cache.act[(e.source, 0.0)], None, None, img, org, tuple(reg.shape[2:]))
            base = cache.base[e.name][img]
            if e.kind == "gap":
                _, h, w = self._steps[e.source].shape
                change = (reg.sum(dim=(2, 3)) - old.sum(dim=(2, 3))) / (h * w)  # (B, C)
                env[e.name] = base + change.reshape(base.shape)
            else:
                tl = plan.tiles[e.name]
                delta = (reg - old).contiguous(memory_format=torch.channels_last)
                env[e.name] = base + linear_update(
                    delta, tl.offset[win], tl.first[win], tl.weight, tl.tile, tl.blocks,
                    tl.n_tiles_x,
                )  # fmt: skip
        for name in self._pads:
            if name in regions and self._last.get(name) == len(t.steps) and name not in env:
                org = plan.regions[name].origin[win]
                env[name] = splice(cache.act[(name, 0.0)], regions[name], org, img)
        for node in self._head:
            env[node.name] = run_node(node, env, t.modules, t.gm)
        return fx.node.map_arg(self._output.args[0], lambda n: env[n.name])  # type: ignore[return-value]


def auto_engine(
    model: nn.Module | Any, image_shape: Sequence[int], device: torch.device | str
) -> tuple[IncrementalEngine | None, str]:
    """The fastest exact engine for ``model``: incremental inference when its graph allows it.

    Args:
        model: the model passed to :func:`pipeline.attribute`.
        image_shape: ``(C, H, W)`` of the images, in pixels.
        device: where the model runs.

    Returns:
        ``(engine, "")``, or ``(None, reason)`` when full forward passes are needed (pass
        ``engine=None``).
    """
    return IncrementalEngine.build_or_reason(model, image_shape, device)
