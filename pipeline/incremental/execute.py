"""Running one batch of occluded copies through the trunk regions and the head.

The trunk computes every layer on its region only (see :mod:`pipeline.incremental.plan`); the
head then updates flatten + Linear and global-average-pool nodes from the change of their input
region, splices regions into full activations for any other head op, and runs the rest of the
graph as the model would.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from pipeline.incremental.graph import Step, Traced
from pipeline.incremental.head import linear_update
from pipeline.incremental.ops import (
    Padded,
    gather_crop,
    input_region,
    merge,
    run_node,
    splice,
)
from pipeline.incremental.plan import Plan

__all__ = ["Runner"]


@dataclass
class Runner:
    """What one batch needs to know about the graph, derived once from a :class:`Traced`.

    Attributes:
        traced: the sorted graph.
        head: head nodes evaluated per batch (those the output needs), in order.
        splices: trunk nodes the head reads in full.
        last: index of the last trunk step that reads each region (``len(steps)`` when the head
            reads it), so that regions are freed early.
        inplace: in-place twins of activation modules and of ``torch.relu`` calls (as after
            a residual add), used when their input region has no other reader (saves a
            write pass and an allocation per layer).
    """

    traced: Traced
    head: list[fx.Node]
    splices: set[str]
    last: dict[str, int]
    inplace: dict[str, Callable[[torch.Tensor], torch.Tensor]]
    channels_last: frozenset[str] = frozenset()

    @classmethod
    def create(cls, traced: Traced) -> Runner:
        """Demand, lifetimes and in-place twins of the nodes of ``traced``."""
        steps = {st.name: st for st in traced.steps}
        output = next(n for n in traced.gm.graph.nodes if n.op == "output")
        need: set[str] = set()
        splices: set[str] = set()
        todo = list(output.all_input_nodes)
        while todo:
            n = todo.pop()
            if n.name in need or n.name in traced.consts:
                continue
            if n.name in steps:
                splices.add(n.name)
                continue
            need.add(n.name)
            if n.name not in traced.entries:  # an entry's value comes from its update
                todo.extend(n.all_input_nodes)
        head = [n for n in traced.head if n.name in need and n.name not in traced.entries]
        last: dict[str, int] = {}
        for i, st in enumerate(traced.steps):
            for u in st.inputs:
                last[u] = i
        for name in splices | {e.source for e in traced.entries.values()}:
            last[name] = len(traced.steps)
        inplace: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        for st in traced.steps:
            module = (
                traced.modules.get(str(st.node.target)) if st.node.op == "call_module" else None
            )
            if st.kind == "pointwise" and hasattr(module, "inplace"):
                twin = copy.copy(module)
                twin.inplace = True  # type: ignore[union-attr]
                inplace[st.name] = twin  # type: ignore[assignment]
            elif st.kind == "pointwise" and _plain_relu(st.node):
                inplace[st.name] = torch.relu_
        channels_last = frozenset(st.name for st in traced.steps if st.channels_last)
        return cls(traced, head, splices, last, inplace, channels_last)

    @property
    def head_reads(self) -> set[str]:
        """Trunk nodes whose regions the head reads."""
        return self.splices | {e.source for e in self.traced.entries.values()}

    def trunk(
        self,
        act: dict[tuple[str, float], Padded],
        plan: Plan,
        fill: torch.Tensor,
        img: torch.Tensor,
        draw: torch.Tensor,
        win: torch.Tensor,
        frozen: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Regions ``(B, C, h, w)`` of the trunk nodes the head reads.

        Args:
            act: cached unoccluded activations by (node, pad value).
            plan: regions of the current window grid.
            fill: ``(N, K, C)`` or ``(N, K, H, W, C)`` baseline fills.
            img, draw, win: ``(B,)`` image, draw and window of each copy.
            frozen: ``(N, C, 1, 1)`` unoccluded values of the frozen gates (:attr:`Step.frozen`).
        """
        frozen = {} if frozen is None else frozen
        t = self.traced
        regions: dict[str, torch.Tensor] = {}
        owned: set[str] = set()  # regions no other tensor aliases: safe to overwrite
        origin = {name: r.origin[win] for name, r in plan.regions.items()}  # (B, 2) each
        for i, st in enumerate(t.steps):
            size = plan.regions[st.name].size
            if st.kind == "input":
                src = act[(st.name, 0.0)]
                box, org = plan.boxes[win], origin[st.name]
                value = input_region(src, fill, box, img, draw, org, size, plan.window)
            elif st.kind == "window":
                value = self._window(st, act, plan, regions, origin, img)
            else:
                value = self._pointwise(st, i, act, plan, regions, owned, origin, img, frozen)
            aliased = [u for u in st.inputs if value.data_ptr() == regions[u].data_ptr()]
            if all(u in owned and self.last.get(u) == i for u in aliased):
                owned.add(st.name)  # a fresh buffer, or one taken over from a finished input
            regions[st.name] = value
            for u in st.inputs:
                if self.last.get(u) == i:
                    del regions[u]
        return regions

    @staticmethod
    def _window(
        st: Step,
        act: dict[tuple[str, float], Padded],
        plan: Plan,
        regions: dict[str, torch.Tensor],
        origin: dict[str, torch.Tensor],
        img: torch.Tensor,
    ) -> torch.Tensor:
        """A conv/pool on its region: reads the input region as is when it is exactly the
        crop, else merges it into a crop of the cache (halo included)."""
        assert st.op is not None and st.axes is not None
        u = st.inputs[0]
        if (st.name, u) in plan.covered:
            return st.op(regions[u])
        size = plan.regions[st.name].size
        parts = [ax.crop(origin[st.name][:, j], size[j]) for j, ax in enumerate(st.axes)]
        start = torch.stack([parts[0][0], parts[1][0]], dim=1)  # (B, 2)
        size_in = (parts[0][1], parts[1][1])
        inside = (st.name, u) in plan.contained
        src = act[(u, st.pad_value)]
        return st.op(merge(src, regions[u], origin[u], img, start, size_in, inside))

    def _pointwise(
        self,
        st: Step,
        i: int,
        act: dict[tuple[str, float], Padded],
        plan: Plan,
        regions: dict[str, torch.Tensor],
        owned: set[str],
        origin: dict[str, torch.Tensor],
        img: torch.Tensor,
        frozen: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """An element-wise op on its region; inputs with another region are cropped to it;
        frozen gates come from the unoccluded pass of each copy's image."""
        t = self.traced
        size = plan.regions[st.name].size
        u = st.inputs[0]
        twin = None if st.frozen else self.inplace.get(st.name)
        alone = len(st.inputs) == 1 and (st.name, u) not in plan.merges
        if twin is not None and alone and u in owned and self.last.get(u) == i:
            return twin(regions[u])
        env: dict[str, Any] = dict(t.consts)
        for g in st.frozen:  # (N, C, 1, 1) of the unoccluded pass -> (B, C, 1, 1)
            env[g] = frozen[g][img]
        for u in st.inputs:
            if (st.name, u) in plan.merges:
                inside = (st.name, u) in plan.contained
                src = act[(u, 0.0)]
                env[u] = merge(src, regions[u], origin[u], img, origin[st.name], size, inside)
            else:
                env[u] = regions[u]
            if u in self.channels_last:  # the op sees the layout it was written for
                env[u] = env[u].permute(0, 2, 3, 1)
        out = run_node(st.node, env, t.modules, t.gm)
        return out.permute(0, 3, 1, 2) if st.name in self.channels_last else out

    def finish(
        self,
        act: dict[tuple[str, float], Padded],
        base: dict[str, torch.Tensor],
        plan: Plan,
        regions: dict[str, torch.Tensor],
        img: torch.Tensor,
        win: torch.Tensor,
    ) -> Any:
        """The model's outputs for the batch: incremental entries, then the remaining head ops
        on full tensors (``base``: the entries' unoccluded values ``(N, ...)``)."""
        t = self.traced
        env: dict[str, Any] = dict(t.consts)
        for e in t.entries.values():
            reg, org = regions[e.source], plan.regions[e.source].origin[win]
            new = reg.permute(0, 2, 3, 1)  # (B, h, w, C)
            old = gather_crop(act[(e.source, 0.0)], img, org, (new.shape[1], new.shape[2]))
            prior = base[e.name][img]
            if e.kind == "gap":
                _, h, w = self._shape(e.source)
                change = (new.sum(dim=(1, 2)) - old.sum(dim=(1, 2))) / (h * w)  # (B, C)
                env[e.name] = prior + change.reshape(prior.shape)
            else:
                tl = plan.tiles[e.name]
                delta = (new - old).contiguous()  # (B, h, w, C)
                first, offset = tl.first[win], tl.offset[win]
                change = linear_update(
                    delta, offset, first, tl.weight, tl.tile, tl.blocks, tl.n_tiles_x
                )
                env[e.name] = prior + change
        for name in self.splices:
            org = plan.regions[name].origin[win]
            env[name] = splice(act[(name, 0.0)], regions[name], org, img)
            if name in self.channels_last:
                env[name] = env[name].permute(0, 2, 3, 1)
        for node in self.head:
            env[node.name] = run_node(node, env, t.modules, t.gm)
        output = next(n for n in reversed(t.gm.graph.nodes) if n.op == "output")
        return fx.node.map_arg(output.args[0], lambda n: env[n.name])

    def _shape(self, name: str) -> tuple[int, int, int]:
        return next(st.shape for st in self.traced.steps if st.name == name)


def _plain_relu(node: fx.Node) -> bool:
    """``torch.relu(x)``, ``F.relu(x)`` or ``x.relu()`` with no other argument."""
    if len(node.args) != 1 or set(node.kwargs) - {"inplace"}:
        return False
    if node.op == "call_function":
        return node.target in (torch.relu, F.relu)
    return node.op == "call_method" and node.target in ("relu", "relu_")
