"""The occlusion kernel: Captum-exact occlusion, batched over windows, draws and images.

For each window position ``p`` and baseline draw ``k``, ``delta = f_t(x) - f_t(x with the window
replaced by the baseline)``. Occluded copies of many images are built on the device by
broadcasting a window mask against the images and their baselines, and go through the model
``max_batch`` at a time, so memory is bounded by ``max_batch`` whatever the number of windows.
The kernel is plain torch: no Ray, pandas or plotting here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.baselines import Baseline, default_draws, make_baselines
from pipeline.geometry import WindowGrid
from pipeline.targets import Score, TargetSpec, Task, output_scores, resolve_targets

__all__ = [
    "PRECISIONS",
    "OcclusionResult",
    "attribute",
    "default_max_batch",
    "expand_map",
    "precision_context",
]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtype
# Images per unoccluded pass. There are N such images against N*K*P occluded copies, so padding
# them to max_batch under fixed_batch would waste up to max_batch - 1 passes per call: a small
# constant keeps the same bitwise reproducibility at a fraction of the padding.
_PLAIN_BATCH = 16


@dataclass(frozen=True)
class OcclusionResult:
    """Occlusion maps of ``N`` images for ``T`` targets each.

    Attributes:
        delta: ``(N, T, Gc, Gh, Gw)`` score drop per window, mean over the ``K`` draws.
        delta_std: ``(N, T, Gc, Gh, Gw)`` population standard deviation over the draws
            (0 when ``K = 1``).
        score: ``(N, T)`` unoccluded score of each target.
        target: ``(N, T)`` output index explained.
        finite: ``(N,)`` False where a score was NaN/Inf (that image's maps are NaN).
        grid: the window geometry (use :meth:`full` or :func:`expand_map` for pixels).
        attributions: ``(N, T, C, H, W)`` full-resolution maps when requested, else None.
    """

    delta: torch.Tensor
    delta_std: torch.Tensor
    score: torch.Tensor
    target: torch.Tensor
    finite: torch.Tensor
    grid: WindowGrid
    attributions: torch.Tensor | None = None

    def full(self) -> torch.Tensor:
        """``(N, T, C, H, W)`` full-resolution maps (computed exactly from ``delta``)."""
        if self.attributions is not None:
            return self.attributions
        return self.grid.expand(self.delta)


class _Forward:
    """Runs the model on plain and occluded batches with one precision and memory format."""

    def __init__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
        precision: str,
        task: Task,
        score: Score,
        channels_last: bool,
        fixed_batch: int | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.model, self.device, self.task, self.score = model, device, task, score
        self.precision = precision
        self.channels_last = channels_last
        self.fixed_batch = fixed_batch  # rows of every occluded pass, when fixed
        self.plain_batch = None if fixed_batch is None else min(fixed_batch, _PLAIN_BATCH)
        self.engine: Any = None  # an engine with forward_occluded(), or None for full passes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, O)`` float32 scores of unoccluded images, ``B`` at most
        ``plain_batch`` when it is set."""
        b = x.shape[0]
        if self.plain_batch is not None and b < self.plain_batch:
            # CPU kernels pick their blocking by batch size; one batch size for every pass makes
            # each image's scores bitwise independent of what else is in its batch.
            x = torch.cat([x, x.new_zeros((self.plain_batch - b, *x.shape[1:]))])
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
        batch: _OccludedBatch | None,
        img: torch.Tensor,
        draw: torch.Tensor,
        win: torch.Tensor,
    ) -> torch.Tensor:
        """Scores ``(B, O)`` of copies ``(img, draw, win)``: image ``img`` with window ``win``
        filled from ``fill[img, draw]``; ``batch`` builds the full copies (None with an
        engine, which never materialises them)."""
        if self.engine is None:
            assert batch is not None
            return self._scores(*batch.build(x, fill, img, draw, win, self.fixed_batch))
        b = img.shape[0]
        if self.fixed_batch is not None and b < self.fixed_batch:
            # the same batch size for every call, as in __call__ (bitwise reproducibility)
            pad = self.fixed_batch - b
            img, draw, win = (torch.cat([t, t[:1].expand(pad)]) for t in (img, draw, win))
        with precision_context(self.device, self.precision):
            out = self.engine.forward_occluded(x, fill, grid, img, draw, win)
        return output_scores(out, img.shape[0], self.task, self.score)[:b]


def precision_context(
    device: torch.device, precision: str
) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to the dtype of ``precision`` on ``device``; nothing for ``fp32``."""
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


class _OccludedBatch:
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
        """The model input holding copies ``(img, draw, win)`` (padded with zero images to
        ``pad_to`` rows when given) and the number of real copies ``B``."""
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
        if rows > b:
            out[b:].zero_()
        return out, b


def default_max_batch(device: torch.device | str, engine: Any = None) -> int:
    """Occluded copies per forward pass when ``max_batch`` is not given.

    256 on GPUs and for an engine (the incremental engine's calls are small crops, so it wants
    many windows per call). 32 for full forward passes on CPU: 32 images already keep the cores
    busy, and larger batches only grow the activations past the caches (seed-shaped CNN at
    224x224 on 2 cores: 128 -> 32 cut peak RSS from 2.7 to 1.0 GiB at the same speed).
    """
    return 256 if engine is not None or torch.device(device).type != "cpu" else 32


def _model_device(model: Any, images: torch.Tensor) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return images.device


def _resolve_baseline(
    baseline: Baseline | str | float | Sequence[float] | torch.Tensor,
    value: float | Sequence[float] | torch.Tensor | None,
) -> tuple[Baseline, Any]:
    if isinstance(baseline, Baseline | str):
        return Baseline(baseline), value
    return Baseline.CONSTANT, baseline


@torch.inference_mode()
def attribute(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    *,
    window: Sequence[int],
    stride: Sequence[int] | None = None,
    baseline: Baseline | str | float | Sequence[float] | torch.Tensor = Baseline.RANDOM_PIXEL,
    n_baselines: int | None = None,
    seed: int = 0,
    image_ids: Sequence[str] | None = None,
    target: TargetSpec = "predicted",
    task: Task | str = Task.CLASSIFICATION,
    score: Score | str = Score.LOGIT,
    value: float | Sequence[float] | torch.Tensor | None = None,
    blur_sigma: float = 4.0,
    max_batch: int | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
    return_full: bool = False,
    on_nonfinite: str = "raise",
    fixed_batch: bool = False,
    engine: Any = None,
) -> OcclusionResult:
    """Occlusion saliency of ``images`` under ``model``, averaged over baseline draws.

    Equals ``captum.attr.Occlusion(model).attribute(images, sliding_window_shapes=(C, h, w),
    strides=(C, sh, sw), baselines=b, target=t)`` for a fixed baseline ``b``; random baselines
    give the mean of such runs over ``K`` draws seeded by ``(seed, image_id)``.

    Args:
        model: maps ``(B, C, H, W)`` pixel-space images to ``(B,)`` or ``(B, O)``; any
            normalisation belongs inside it (occlusion happens in pixel space).
        images: ``(N, C, H, W)`` float images, e.g. RGB in [0, 1]. Not modified.
        window: ``[h, w]`` (spans all channels) or ``[c, h, w]``, in pixels.
        stride: like ``window``; default half the window.
        baseline: a :class:`Baseline` name, or a scalar / ``(C,)`` / ``(C, H, W)`` /
            ``(N, C, H, W)`` constant.
        n_baselines: draws ``K`` (default 3 for random baselines, else 1).
        seed: with ``image_ids``, fixes the random draws.
        image_ids: ``N`` stable ids (default ``"0".."N-1"``: pass real ids so that maps do not
            depend on the order of images).
        target: ``"predicted"``, an index, ``N`` indices or ``(N, T)`` indices.
        task: ``classification`` or ``regression``.
        score: ``logit`` or ``probability`` (classification only).
        value: fill value for ``baseline="constant"``.
        blur_sigma: Gaussian sigma in pixels for ``baseline="blur"``.
        max_batch: occluded copies per forward pass (or engine call); bounds memory. None:
            :func:`default_max_batch` for the model's device and engine.
        precision: ``fp32``, or ``bf16``/``fp16`` autocast (CUDA; maps then agree with fp32 to
            about 1e-2 of the score scale).
        channels_last: feed the model channels-last tensors (faster for convnets on CUDA).
        return_full: also return ``(N, T, C, H, W)`` full-resolution maps.
        on_nonfinite: ``"raise"`` on a NaN/Inf score, or ``"nan"`` to give that image NaN maps
            and ``finite=False``.
        fixed_batch: pad every occluded pass to exactly ``max_batch`` copies (and every
            unoccluded pass to ``min(max_batch, 16)`` images), so that maps are bitwise
            identical however images are grouped into calls (at the cost of padding the last
            batch of each call). Without it they agree to float rounding (~1e-7).
        engine: computes occluded scores without materialising full copies (an object with
            ``forward_occluded(x, fill, grid, img, draw, win) -> (B, ...)`` raw outputs, e.g.
            the incremental engine for convolutional models); None runs full forward passes.

    Returns:
        An :class:`OcclusionResult`.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> r = attribute(net, torch.rand(2, 3, 8, 8), window=[4, 4], stride=[2, 2])
        >>> r.delta.shape, r.full().shape
        (torch.Size([2, 1, 1, 3, 3]), torch.Size([2, 1, 3, 8, 8]))
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if on_nonfinite not in ("raise", "nan"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'nan', got {on_nonfinite!r}")
    n = images.shape[0]
    grid = WindowGrid.create(images.shape[1:], window, stride)
    ids = [str(i) for i in range(n)] if image_ids is None else [str(i) for i in image_ids]
    kind, value = _resolve_baseline(baseline, value)
    k = default_draws(kind) if n_baselines is None else int(n_baselines)
    device = _model_device(model, images)
    max_batch = default_max_batch(device, engine) if max_batch is None else int(max_batch)
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    fwd = _Forward(
        model,
        device,
        precision,
        Task(task),
        Score(score),
        channels_last,
        max_batch if fixed_batch else None,
    )
    fwd.engine = engine

    x = images.to(device=device, dtype=torch.float32)  # a copy only when needed; never written
    base = make_baselines(
        x, kind, k, seed=seed, image_ids=ids, value=value, blur_sigma=blur_sigma
    )  # (N, K, C, 1|H, 1|W)
    plain = max_batch if fwd.plain_batch is None else fwd.plain_batch
    scores0 = torch.cat([fwd(x[i : i + plain]) for i in range(0, n, plain)])  # (N, O)
    finite = torch.isfinite(scores0).all(dim=1)
    _check_finite(finite, ids, on_nonfinite, "unoccluded")
    tgt = resolve_targets(target, torch.nan_to_num(scores0), fwd.task)  # (N, T)
    score0 = scores0.gather(1, tgt)  # (N, T)

    deltas = _occluded_deltas(fwd, x, base, grid, tgt, score0, max_batch)  # (N, K, T, P)
    bad = ~torch.isfinite(deltas).flatten(1).all(dim=1)
    _check_finite(~bad, ids, on_nonfinite, "occluded")
    finite = finite & ~bad
    shape = (n, tgt.shape[1], *grid.counts)
    delta = deltas.mean(dim=1).reshape(shape)
    delta_std = deltas.std(dim=1, correction=0).reshape(shape)
    delta[~finite] = float("nan")
    delta_std[~finite] = float("nan")
    return OcclusionResult(
        delta=delta,
        delta_std=delta_std,
        score=score0,
        target=tgt,
        finite=finite,
        grid=grid,
        attributions=grid.expand(delta) if return_full else None,
    )


def _check_finite(ok: torch.Tensor, ids: Sequence[str], mode: str, what: str) -> None:
    if mode == "raise" and not bool(ok.all()):
        bad = [ids[i] for i in torch.nonzero(~ok).flatten().tolist()]
        raise ValueError(f"the model returned NaN/Inf {what} scores for image(s) {bad[:10]}")


def _occluded_deltas(
    fwd: _Forward,
    x: torch.Tensor,
    base: torch.Tensor,
    grid: WindowGrid,
    tgt: torch.Tensor,
    score0: torch.Tensor,
    max_batch: int,
) -> torch.Tensor:
    """Score drops of every (image, draw, window) copy.

    Copies are enumerated image-major as ``q = (n * K + k) * P + p`` and processed in chunks of
    ``max_batch``, so a batch mixes windows and draws of several images.

    Returns:
        ``(N, K, T, P)`` float32 deltas.
    """
    n, k = base.shape[:2]
    p_count = grid.n_windows
    batch = None
    if fwd.engine is None:  # an engine never materialises full copies: no buffer for them
        rows = min(max_batch, n * k * p_count) if fwd.fixed_batch is None else fwd.fixed_batch
        batch = _OccludedBatch(x, grid, rows, fwd.channels_last)
    out = torch.empty((n * k * p_count, tgt.shape[1]), dtype=torch.float32, device=x.device)
    total = out.shape[0]
    for q0 in range(0, total, max_batch):
        q = torch.arange(q0, min(q0 + max_batch, total), device=x.device)  # (B,)
        img, draw, win = q // (k * p_count), (q // p_count) % k, q % p_count
        s = fwd.occluded(x, base, grid, batch, img, draw, win).gather(1, tgt[img])  # (B, T)
        out[q0 : q0 + q.numel()] = score0[img] - s
    return out.view(n, k, p_count, -1).permute(0, 1, 3, 2)  # (N, K, T, P)


def expand_map(row: Mapping[str, Any], channels: bool = False) -> np.ndarray:
    """Full-resolution map of one stored row (``RUN_DIR/maps`` Parquet), recomputed exactly.

    Args:
        row: a mapping with ``delta``, ``image_c``/``image_h``/``image_w``, ``window``,
            ``stride`` (as stored; e.g. a dict from ``pandas.DataFrame.iloc[i]``).
        channels: return ``(C, H, W)`` instead of the channel mean ``(H, W)``.

    Returns:
        float32 array ``(H, W)`` (mean over channels) or ``(C, H, W)``; pixel value is the mean
        score drop of the windows covering it.
    """
    image = (int(row["image_c"]), int(row["image_h"]), int(row["image_w"]))
    grid = WindowGrid.create(image, list(row["window"]), list(row["stride"]))
    delta = torch.as_tensor(np.asarray(row["delta"], dtype=np.float32)).reshape(grid.counts)
    full = grid.expand(delta)  # (C, H, W)
    return (full if channels else full.mean(dim=0)).numpy()
