"""Forward passes of the kernel: plain and occluded batches, and the buffer of occluded copies.

:class:`Forward` runs the model with one precision, memory format and batch policy, either on
full occluded copies (built by :class:`OccludedBatch`) or through an engine that never
materialises them. Plain torch.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from pipeline.kernel.defaults import Engine, Precision
from pipeline.kernel.geometry import WindowGrid
from pipeline.kernel.options import ComputeOptions, default_max_batch, precision_context
from pipeline.kernel.targets import Score, Task, output_scores, score_tensor

__all__ = ["PLAIN_BATCH", "Forward", "OccludedBatch", "accepts_channels_last", "resolve_options"]

# Images per unoccluded pass. There are N such images against N*K*P occluded copies, so padding
# them to max_batch under fixed_batch would waste up to max_batch - 1 passes per call: a small
# constant keeps the same bitwise reproducibility at a fraction of the padding.
PLAIN_BATCH = 16


_CHANNELS_LAST: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


@torch.inference_mode()
def accepts_channels_last(
    model: Callable[[torch.Tensor], torch.Tensor],
    image_shape: tuple[int, ...],
    device: torch.device,
) -> bool:
    """Whether ``model`` takes channels-last input and computes the same outputs with it.

    Two seeded ``(2, C, H, W)`` inputs go through the model in both memory formats; a model that
    raises (``.view()`` on a conv output) or whose outputs differ beyond float rounding
    (``rtol=1e-3``) gets False. The answer is cached per model object, so a worker or an API
    caller probes once. Deterministic: the same model always gets the same answer, and so the
    same maps.
    """
    try:
        return _CHANNELS_LAST[model]
    except (KeyError, TypeError):
        pass
    ok = False
    if len(image_shape) == 3:  # channels-last is a layout of (N, C, H, W) batches only
        gen = torch.Generator().manual_seed(0)
        x = torch.rand((2, *image_shape), generator=gen).to(device)
        try:
            plain = score_tensor(model(x))
            last = score_tensor(model(x.contiguous(memory_format=torch.channels_last)))
            ok = plain.shape == last.shape and torch.allclose(
                plain.float(), last.float(), rtol=1e-3, atol=1e-5
            )
        except Exception:
            ok = False
    with contextlib.suppress(TypeError):  # a model object that cannot be weakly referenced
        _CHANNELS_LAST[model] = ok
    return ok


def resolve_options(
    options: ComputeOptions,
    model: Callable[[torch.Tensor], torch.Tensor],
    image_shape: tuple[int, ...],
    device: torch.device,
) -> ComputeOptions:
    """``options`` with ``max_batch`` and ``channels_last`` decided for ``model`` on ``device``:
    the one place either is resolved, for the kernel, the public API and every worker.

    ``options.engine`` must be ``generic`` or an engine object: choosing an engine for a model
    (``auto``, ``incremental``, ``approximate``) is the job of
    :func:`pipeline.incremental.select.resolve_compute`, above the kernel.

    Raises:
        ValueError: an engine choice that is not resolved yet.
    """
    engine = options.engine
    if isinstance(engine, Engine) and engine is not Engine.GENERIC:
        raise ValueError(
            f"engine '{engine}' is a choice the kernel does not make: pipeline.attribute (or "
            "pipeline.incremental.select.resolve_compute) turns it into an engine object"
        )
    obj = None if engine is Engine.GENERIC else engine
    max_batch = options.max_batch or default_max_batch(device, obj)
    channels_last = options.channels_last
    if channels_last is None:  # auto: full passes of a model that takes it run channels-last
        channels_last = obj is None and accepts_channels_last(model, tuple(image_shape), device)
    return replace(options, max_batch=max_batch, channels_last=channels_last)


class Forward:
    """Runs the model on plain and occluded batches with one precision and memory format."""

    def __init__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
        precision: Precision,
        task: Task,
        score: Score,
        channels_last: bool,
        fixed_batch: int | None = None,
    ) -> None:
        self.model, self.device, self.task, self.score = model, device, task, score
        self.precision = precision
        self.channels_last = channels_last
        # max_batch when every pass has a fixed size (occluded passes: pipeline.kernel.passes)
        self.fixed_batch = fixed_batch
        self.plain_batch = None if fixed_batch is None else min(fixed_batch, PLAIN_BATCH)
        self.engine: Any = None  # an engine with forward_occluded(), or None for full passes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, O)`` float32 scores of unoccluded images, ``B`` at most
        ``plain_batch`` when it is set."""
        b = x.shape[0]
        if self.plain_batch is not None and b < self.plain_batch:
            # CPU kernels pick their blocking by batch size; one batch size for every pass makes
            # each image's scores bitwise independent of what else is in its batch. The padding
            # repeats a real image: a model may reject (or NaN on) a blank input.
            x = torch.cat([x, x[:1].expand(self.plain_batch - b, *x.shape[1:])])
        return self._scores(x, b)

    def _scores(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """Scores ``(b, O)`` of the first ``b`` images of the model input ``x``."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision_context(self.device, self.precision):
            out = self.model(x)
        return output_scores(out, x.shape[0], self.task, self.score)[:b]

    def occluded(
        self,
        x: torch.Tensor,
        fill: torch.Tensor,
        grid: WindowGrid,
        batch: OccludedBatch | None,
        img: torch.Tensor,
        draw: torch.Tensor,
        win: torch.Tensor,
        rows: int | None = None,
    ) -> torch.Tensor:
        """Scores ``(B, O)`` of copies ``(img, draw, win)``: image ``img`` with window ``win``
        filled from ``fill[img, draw]``; ``batch`` builds the full copies (None with an
        engine, which never materialises them). ``rows``: the pass is padded to that many
        copies (:func:`pipeline.kernel.passes.pass_rows`), or None for no padding."""
        if self.engine is None:
            assert batch is not None
            return self._scores(*batch.build(x, fill, img, draw, win, rows))
        b = img.shape[0]
        if rows is not None and b < rows:
            # the same batch size for every call, as in __call__ (bitwise reproducibility)
            pad = rows - b
            img, draw, win = (torch.cat([t, t[:1].expand(pad)]) for t in (img, draw, win))
        with precision_context(self.device, self.precision):
            out = self.engine.forward_occluded(x, fill, grid, img, draw, win)
        return output_scores(out, img.shape[0], self.task, self.score)[:b]


class OccludedBatch:
    """Builds batches of occluded copies in one reused input buffer.

    On CPU each copy is its image with one window painted over: only the window's ``c*h*w``
    values are written per copy (a 32x32 window is 2% of a 224x224 image), and the buffer is
    allocated once, so no fresh pages are faulted in per batch. On CUDA one masked select over
    the whole batch is a single kernel, cheaper than hundreds of small slice writes.
    """

    def __init__(
        self,
        x: torch.Tensor,
        grid: WindowGrid,
        rows: int,
        channels_last: bool,
        paint: bool | None = None,
    ) -> None:
        self.paint = x.device.type == "cpu" if paint is None else paint
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.buf = torch.empty((rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
        self.buf = self.buf.contiguous(memory_format=fmt)  # (rows, C, H, W)
        self.boxes = grid.boxes().tolist()  # (P, 6) window boxes, as Python ints
        self.masks = None if self.paint else grid.masks(device=x.device)  # (P, 1|C, H, W)

    def build(
        self,
        x: torch.Tensor,
        fill: torch.Tensor,
        img: torch.Tensor,
        draw: torch.Tensor,
        win: torch.Tensor,
        pad_to: int | None,
    ) -> tuple[torch.Tensor, int]:
        """The model input holding copies ``(img, draw, win)`` (padded to ``pad_to`` rows with
        the first copy when given) and the number of real copies ``B``."""
        b = img.shape[0]
        rows = b if pad_to is None else max(b, pad_to)
        out = self.buf[:rows]
        if not self.paint:
            assert self.masks is not None
            # (B, 1|C, H, W) mask against (B, C, 1|H, 1|W) fill and (B, C, H, W) images
            torch.where(self.masks[win], fill[img, draw], x[img], out=out[:b])
        else:
            ii, dd, ww = img.tolist(), draw.tolist(), win.tolist()
            j = 0
            while j < b:  # copy each run of copies of one image in a single broadcast
                e = j + 1
                while e < b and ii[e] == ii[j]:
                    e += 1
                out[j:e].copy_(x[ii[j]].expand(e - j, *x.shape[1:]))
                j = e
            rows_h, cols_w = fill.shape[-2] > 1, fill.shape[-1] > 1
            for j in range(b):
                c0, c1, y0, y1, x0, x1 = self.boxes[ww[j]]
                f = fill[ii[j], dd[j], c0:c1]  # (c, 1|H, 1|W): broadcasts over the window
                f = f[:, y0:y1] if rows_h else f
                out[j, c0:c1, y0:y1, x0:x1] = f[..., x0:x1] if cols_w else f
        if rows > b:  # padding repeats a real copy: a model may reject a blank input
            out[b:].copy_(out[:1].expand(rows - b, *out.shape[1:]))
        return out, b
