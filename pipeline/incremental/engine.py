"""Exact incremental inference of occluded copies for convolutional models (Krypton).

An occluding window changes each feature map only inside the window's projective field; outside
it every activation equals the unoccluded pass. The engine runs each image once, caches every
trunk activation, and for a batch of occluded copies computes each layer only on the changed
region (plus the halo its kernel reads), splices it into the cache, and updates the head from
the change alone: ``y = y0 + W[:, changed] @ (a_new - a_old)[changed]`` for flatten + Linear,
``mean = mean0 + (sum(new) - sum(old)) / HW`` for global average pooling (Nakandala, Kumar and
Papakonstantinou, "Incremental and Approximate Inference for Faster Occlusion-based Deep CNN
Explanations", SIGMOD 2019). The results equal full forward passes up to float rounding.

Memory: the padded channels-last activations of the images of one ``attribute()`` call (about
twice one forward pass's activations per image), plus the regions of one trunk chunk.

Example:
    >>> from pipeline import ComputeOptions, attribute
    >>> from pipeline.models.nets import SeedCNN
    >>> net = SeedCNN(num_classes=2, input_dim=32).eval()
    >>> x = torch.rand(2, 3, 32, 32)
    >>> engine, reason = auto_engine(net, x.shape[1:], x.device)
    >>> opts = ComputeOptions(engine=engine)
    >>> attribute(net, x, window=[8, 8], stride=[4, 4], options=opts).delta.shape
    torch.Size([2, 1, 1, 7, 7])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.incremental.execute import Runner
from pipeline.incremental.graph import Traced, trace_model
from pipeline.incremental.ops import Padded, run_node
from pipeline.incremental.plan import Plan, make_plan
from pipeline.kernel.geometry import WindowGrid

__all__ = ["IncrementalEngine", "auto_engine"]

# Images per unoccluded pass when filling the cache. One: a batched pass may round differently
# at another batch size, and every occluded score is built on these activations, so a cache
# filled per image keeps each map bitwise independent of the other images of the call. The
# pass is one full forward pass per image against K * P occluded copies, so batching it saves
# little; one image also bounds its peak memory.
_CACHE_CHUNK = 1
_CHUNK_BYTES = 64 << 20  # bytes of the largest region or crop of one trunk chunk


@dataclass
class _Cache:
    """Unoccluded activations of the images of one ``attribute()`` call."""

    key: tuple[Any, ...]
    images: torch.Tensor  # held so that the key's id and data_ptr stay unique
    act: dict[tuple[str, float], Padded]  # (node, pad value) -> padded channels-last activation
    base: dict[str, torch.Tensor]  # entry node -> (N, ...) unoccluded value
    frozen: dict[str, torch.Tensor]  # frozen gate -> (N, C, 1, 1) unoccluded value


def _tensor_key(x: torch.Tensor) -> tuple[Any, ...]:
    """Identity and version of ``x``. The caches hold a reference to ``x`` itself, so its memory
    cannot be reused by another tensor while the key is alive."""
    try:
        version = x._version
    except RuntimeError:  # inference tensors have no version counter
        version = -1
    return (id(x), x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device, version)


class IncrementalEngine:
    """Occluded outputs of a convolutional model from its cached unoccluded activations.

    Build it with :meth:`build` or :func:`auto_engine` (None for models it cannot run), then
    pass it as ``attribute(..., options=ComputeOptions(engine=engine))``.
    """

    name = "incremental"

    def __init__(self, traced: Traced, image_shape: tuple[int, int, int]) -> None:
        self.traced = traced
        self.image_shape = image_shape
        self._steps = {st.name: st for st in traced.steps}
        self._input = traced.steps[0].name
        self._frozen = {g for st in traced.steps for g in st.frozen}
        self._runner = Runner.create(traced)
        self._pads = self._padding()
        self._plans: dict[tuple[WindowGrid, torch.device, float], Plan] = {}
        self._cache: _Cache | None = None
        self._fill_cache: tuple[tuple[Any, ...], torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def build_or_reason(
        cls,
        model: Any,
        image_shape: Sequence[int],
        device: torch.device | str,
        freeze_gates: bool = False,
    ) -> tuple[IncrementalEngine | None, str]:
        """An engine for ``model`` on ``(C, H, W)`` images, or None and why not.

        Args:
            freeze_gates: read squeeze-excitation-like gates from the unoccluded pass instead of
                refusing them (approximate: for :class:`~pipeline.incremental.approximate.
                ApproximateEngine`, which measures the error).

        Returns:
            ``(engine, "")`` or ``(None, reason)``, e.g. ``"incremental engine: cannot follow
            module Softmax at 1: it reads the activation of module Conv2d at 0 ..."``.
        """
        shape = (int(image_shape[0]), int(image_shape[1]), int(image_shape[2]))
        with torch.no_grad():
            traced = trace_model(model, shape, torch.device(device), freeze_gates)
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

    def _padding(self) -> dict[str, dict[float, list[int]]]:
        """Padding ``[top, bottom, left, right]`` of every cached activation, per pad value:
        the halo of its conv/pool readers, none for merges and head reads."""
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
        for name in self._runner.head_reads:
            need(name, 0.0)
        return pads

    # ---- caches ----------------------------------------------------------------------------

    def plan(self, grid: WindowGrid, device: torch.device, approx_threshold: float = 1.0) -> Plan:
        """The regions of every node for the windows of ``grid`` (cached), with changed boxes
        capped at ``approx_threshold`` (in (0, 1]; 1: exact)."""
        if grid.image != self.image_shape:
            raise ValueError(
                f"this engine was built for images of shape {self.image_shape}, got windows over "
                f"{grid.image}; build one per image size"
            )
        key = (grid, torch.device(device), float(approx_threshold))
        if key not in self._plans:
            t = self.traced
            heads = self._runner.head_reads
            self._plans[key] = make_plan(t.steps, t.entries, heads, grid, key[1], key[2])
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
        gates: dict[str, list[torch.Tensor]] = {g: [] for g in self._frozen}
        for i in range(0, x.shape[0], _CACHE_CHUNK):
            env: dict[str, Any] = dict(t.consts)
            env[self._input] = x[i : i + _CACHE_CHUNK]
            self._store(self._input, env, parts, bases)
            for node in t.gm.graph.nodes:
                if node.op in ("placeholder", "output") or node.name in t.consts:
                    continue
                env[node.name] = run_node(node, env, t.modules, t.gm)
                self._store(node.name, env, parts, bases)
                if node.name in gates:
                    gates[node.name].append(env[node.name])
        act = {}
        for (name, value), chunks in parts.items():
            top, _, left, _ = self._pads[name][value]
            _, h, w = self._steps[name].shape
            act[(name, value)] = Padded(torch.cat(chunks), top, left, (h, w))
        base = {k: torch.cat(v) for k, v in bases.items()}
        self._cache = _Cache(key, x, act, base, {k: torch.cat(v) for k, v in gates.items()})
        return self._cache

    def _store(
        self,
        name: str,
        env: dict[str, Any],
        parts: dict[tuple[str, float], list[torch.Tensor]],
        bases: dict[str, list[torch.Tensor]],
    ) -> None:
        """Keep node ``name``'s value: padded channels-last for crops, as is for entries."""
        pads = self._pads.get(name, {})
        full = env[name]
        if pads and self._steps[name].channels_last:  # cached (N, C, H, W) like every region
            full = full.permute(0, 3, 1, 2)
        for value, (top, bottom, left, right) in pads.items():
            padded = F.pad(full, (left, right, top, bottom), value=value)
            parts.setdefault((name, value), []).append(padded.permute(0, 2, 3, 1).contiguous())
        if name in self.traced.entries:
            bases.setdefault(name, []).append(env[name])

    def clear(self) -> None:
        """Release the cached activations (they are otherwise kept until the next images)."""
        self._cache = None
        self._fill_cache = None

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
        approx_threshold: float = 1.0,
    ) -> torch.Tensor:
        """Raw model outputs of occluded copies, as ``model(occluded_copy)`` would return them.

        Args:
            x: ``(N, C, H, W)`` unoccluded images (activations are cached per tensor).
            fill: ``(N, K, C, 1|H, 1|W)`` baseline fill of every image and draw.
            grid: the window geometry.
            img, draw, win: ``(B,)`` int64 image, draw and window of each copy.
            approx_threshold: in (0, 1]: each layer's changed region is capped to this fraction
                of its side, the rest keeps unoccluded values (1: exact; below 1 the outputs
                are approximate, see :class:`~pipeline.incremental.approximate.ApproximateEngine`).

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
        plan = self.plan(grid, x.device, approx_threshold)
        fills = self._fill(fill, x)
        # The trunk runs in chunks, which bounds its peak memory whatever max_batch is; chunks
        # stay large because every op costs a thread synchronisation, which dominates small ops
        # on a busy CPU. The head's tile matmul then runs once on the whole batch.
        step = self._chunk(plan)
        parts = [
            self._runner.trunk(
                cache.act, plan, fills, *(t[i : i + step] for t in (img, draw, win)), cache.frozen
            )
            for i in range(0, img.shape[0], step)
        ]
        regions = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return self._runner.finish(cache.act, cache.base, plan, regions, img, win)

    def _chunk(self, plan: Plan) -> int:
        """Copies per trunk chunk: about ``_CHUNK_BYTES`` for the largest region or crop."""
        largest = 1
        for st in self.traced.steps:
            h, w = plan.regions[st.name].size
            largest = max(largest, st.shape[0] * h * w)
            if st.axes is not None:  # the crop it reads
                c_in = self._steps[st.inputs[0]].shape[0]
                largest = max(largest, c_in * st.axes[0].reads(h) * st.axes[1].reads(w))
        return max(1, _CHUNK_BYTES // (4 * largest))

    def _fill(self, fill: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``(N, K, C)`` colour fills, or ``(N, K, H, W, C)`` per-pixel fills (cached per
        tensor: the kernel passes the same one for every batch)."""
        if fill.shape[-1] == 1 and fill.shape[-2] == 1:
            return fill[..., 0, 0]
        key = _tensor_key(fill)
        if self._fill_cache is None or self._fill_cache[0] != key:
            full = fill.expand(*fill.shape[:3], *x.shape[2:])
            self._fill_cache = (key, fill, full.permute(0, 1, 3, 4, 2).contiguous())
        return self._fill_cache[2]


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
