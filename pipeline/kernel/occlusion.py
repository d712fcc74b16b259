"""The occlusion kernel: Captum-exact occlusion, batched over windows, draws and images.

For each window position ``p`` and baseline draw ``k``, ``delta = f_t(x) - f_t(x with the window
replaced by the baseline)`` (``mode="fill"``; ``mode="token-drop"`` removes the window's patch
tokens from a ViT instead, :mod:`pipeline.kernel.tokens`). Occluded copies of many images are
built on the device by broadcasting a window mask against the images and their baselines, and go
through the model at most ``max_batch`` at a time (:mod:`pipeline.kernel.passes`), so memory is
bounded by ``max_batch`` whatever the number of windows. The kernel is plain torch: no Ray,
pandas or plotting here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.kernel import defaults
from pipeline.kernel.approx_check import approx_error as _approx_error
from pipeline.kernel.approx_check import check_windows
from pipeline.kernel.baselines import make_baselines
from pipeline.kernel.compiled import compiled
from pipeline.kernel.defaults import Baseline, Engine, Mode, default_draws
from pipeline.kernel.forward import Forward, OccludedBatch, resolve_options
from pipeline.kernel.geometry import WindowGrid
from pipeline.kernel.options import ComputeOptions
from pipeline.kernel.passes import pass_rows, pass_spans
from pipeline.kernel.targets import Score, TargetSpec, Task, resolve_targets
from pipeline.kernel.tokens import check_token_grid, check_token_mode, token_deltas

__all__ = ["OcclusionResult", "check_windows", "expand_map", "model_device", "occlude"]


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
        approx_error: ``(N,)`` float32, approximate engines only (else None, as when
            ``approx_check_windows`` is 0): the largest ``|approximate - exact|`` score drop,
            in the units of ``delta`` (score units), over the image's ``n`` check windows
            (drawn uniformly, seeded by ``seed`` and the image id: :func:`check_windows`), its
            ``K`` draws and its ``T`` targets. With probability at least ``1 - q^n`` it is at
            least the ``q``-quantile of the image's per-window errors (``n = 29``, the default:
            the 90th percentile with 95% confidence; :mod:`pipeline.kernel.approx_check`).
            Never NaN: NaN/Inf scores count as no difference (``finite`` flags those images,
            whose maps are NaN).
    """

    delta: torch.Tensor
    delta_std: torch.Tensor
    score: torch.Tensor
    target: torch.Tensor
    finite: torch.Tensor
    grid: WindowGrid
    attributions: torch.Tensor | None = None
    approx_error: torch.Tensor | None = None

    def full(self) -> torch.Tensor:
        """``(N, T, C, H, W)`` full-resolution maps (computed exactly from ``delta``)."""
        if self.attributions is not None:
            return self.attributions
        return self.grid.expand(self.delta)


def model_device(model: Any, images: torch.Tensor) -> torch.device:
    """Where ``model``'s parameters (or buffers) live; the images' device for a model without
    any (a plain function)."""
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
def occlude(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    *,
    mode: Mode | str = defaults.MODE,
    window: Sequence[int] = defaults.WINDOW,
    stride: Sequence[int] | None = defaults.STRIDE,
    baseline: Baseline | str | float | Sequence[float] | torch.Tensor = defaults.BASELINE,
    n_baselines: int | None = defaults.N_BASELINES,
    seed: int = defaults.SEED,
    value: float | Sequence[float] | torch.Tensor | None = defaults.VALUE,
    blur_sigma: float = defaults.BLUR_SIGMA,
    image_ids: Sequence[str] | None = None,
    target: TargetSpec = "predicted",
    task: Task | str = Task.CLASSIFICATION,
    score: Score | str = Score.LOGIT,
    return_full: bool = False,
    options: ComputeOptions | None = None,
) -> OcclusionResult:
    """Occlusion saliency of ``images`` under ``model``, averaged over baseline draws.

    Equals ``captum.attr.Occlusion(model).attribute(images, sliding_window_shapes=(C, h, w),
    strides=(C, sh, sw), baselines=b, target=t)`` for a fixed baseline ``b`` (to 1e-5 in fp32,
    checked against Captum in the tests); random baselines give the mean of such runs over ``K``
    draws seeded by ``(seed, image_id)``. The keywords say what to compute; ``options`` says
    how (batch, precision, memory format, engine), which changes maps by float rounding at most.

    Args:
        model: maps ``(B, C, H, W)`` pixel-space images to ``(B,)`` or ``(B, O)``; any
            normalisation belongs inside it (occlusion happens in pixel space).
        images: ``(N, C, H, W)`` float images, e.g. RGB in [0, 1]. Not modified.
        mode: ``fill`` (the window's pixels replaced by a baseline) or ``token-drop`` (the
            patch tokens under the window removed; ``model`` a
            :class:`~pipeline.kernel.tokens.TokenModel`, windows on its patch grid, ``K = 1``,
            ``baseline``, ``value`` and ``blur_sigma`` unused).
        window: ``[h, w]`` (spans all channels) or ``[c, h, w]``, in pixels.
        stride: like ``window``; None: half the window.
        baseline: a :class:`Baseline` name, or a scalar / ``(C,)`` / ``(C, H, W)`` /
            ``(N, C, H, W)`` constant.
        n_baselines: draws ``K`` (None: 3 for random baselines, else 1).
        seed: with ``image_ids``, fixes the random draws.
        value: fill value for ``baseline="constant"``.
        blur_sigma: Gaussian sigma in pixels for ``baseline="blur"``.
        image_ids: ``N`` stable ids (default ``"0".."N-1"``: pass real ids so that maps do not
            depend on the order of images).
        target: ``"predicted"``, an index, ``N`` indices or ``(N, T)`` indices.
        task: ``classification`` or ``regression``.
        score: ``logit`` or ``probability`` (classification only).
        return_full: also return ``(N, T, C, H, W)`` full-resolution maps.
        options: how to compute (:class:`ComputeOptions`); its engine is ``generic`` or an
            engine object (default: generic full passes). :func:`pipeline.attribute` takes an
            engine choice (``auto``, the default there) and resolves it before calling this.

    Returns:
        An :class:`OcclusionResult`.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> r = occlude(net, torch.rand(2, 3, 8, 8), window=[4, 4], stride=[2, 2])
        >>> r.delta.shape, r.full().shape
        (torch.Size([2, 1, 1, 3, 3]), torch.Size([2, 1, 3, 8, 8]))
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    opts = ComputeOptions(engine=Engine.GENERIC) if options is None else options
    n = images.shape[0]
    grid = WindowGrid.create(images.shape[1:], window, stride)
    ids = [str(i) for i in range(n)] if image_ids is None else [str(i) for i in image_ids]
    kind, value = _resolve_baseline(baseline, value)
    device = model_device(model, images)
    tokens = None  # mode token-drop: the model's tokens, no baseline (one draw)
    if Mode(mode) is Mode.TOKEN_DROP:
        tokens = check_token_mode(model, n_baselines, opts.engine)
        check_token_grid(grid, tokens)  # windows on the model's patch grid
    opts = resolve_options(opts, model, tuple(images.shape[1:]), device)
    engine = None if opts.engine is Engine.GENERIC else opts.engine
    max_batch, channels_last = int(opts.max_batch or 1), bool(opts.channels_last)
    fwd = Forward(
        compiled(model) if opts.compile else model,
        device,
        opts.precision,
        Task(task),
        Score(score),
        channels_last,
        max_batch if opts.fixed_batch else None,
    )
    fwd.engine = engine

    x = images.to(device=device, dtype=torch.float32)  # a copy only when needed; never written
    plain = max_batch if fwd.plain_batch is None else fwd.plain_batch
    scores0 = torch.cat([fwd(x[i : i + plain]) for i in range(0, n, plain)])  # (N, O)
    finite = torch.isfinite(scores0).all(dim=1)
    _check_finite(finite, ids, opts.on_nonfinite, "unoccluded")
    tgt = resolve_targets(target, torch.nan_to_num(scores0), fwd.task)  # (N, T)
    score0 = scores0.gather(1, tgt)  # (N, T)

    approx_error = None
    if tokens is not None:
        deltas = token_deltas(fwd, tokens, x, grid, tgt, score0, max_batch)  # (N, 1, T, P)
    else:
        k = default_draws(kind) if n_baselines is None else int(n_baselines)
        base = make_baselines(
            x, kind, k, seed=seed, image_ids=ids, value=value, blur_sigma=blur_sigma
        )  # (N, K, C, 1|H, 1|W)
        deltas = _occluded_deltas(fwd, x, base, grid, tgt, score0, max_batch)  # (N, K, T, P)
    if getattr(engine, "exact", None) is not None and opts.approx_check_windows > 0:
        wins = check_windows(grid.n_windows, opts.approx_check_windows, ids, seed).to(device)
        exact = copy.copy(fwd)  # same precision and batching, the exact engine
        exact.engine = engine.exact  # type: ignore[union-attr]
        approx_error = _approx_error(exact, x, base, grid, tgt, score0, deltas, wins, max_batch)
    bad = ~torch.isfinite(deltas).flatten(1).all(dim=1)
    _check_finite(~bad, ids, opts.on_nonfinite, "occluded")
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
        approx_error=approx_error,
    )


def _check_finite(ok: torch.Tensor, ids: Sequence[str], mode: str, what: str) -> None:
    if mode == "raise" and not bool(ok.all()):
        bad = [ids[i] for i in torch.nonzero(~ok).flatten().tolist()]
        raise ValueError(f"the model returned NaN/Inf {what} scores for image(s) {bad[:10]}")


def _occluded_deltas(
    fwd: Forward,
    x: torch.Tensor,
    base: torch.Tensor,
    grid: WindowGrid,
    tgt: torch.Tensor,
    score0: torch.Tensor,
    max_batch: int,
) -> torch.Tensor:
    """Score drops of every (image, draw, window) copy.

    Copies are enumerated image-major as ``q = (n * K + k) * P + p`` and go through the model
    in the passes of :func:`~pipeline.kernel.passes.pass_spans`: ``max_batch`` at a time, or,
    under ``fwd.fixed_batch``, passes of ``pass_rows(K * P, max_batch)`` rows (the last padded
    by repeating a real copy), a size the same for every image of a run.

    Returns:
        ``(N, K, T, P)`` float32 deltas.
    """
    n, k = base.shape[:2]
    p_count = grid.n_windows
    fixed = fwd.fixed_batch is not None
    spans = pass_spans(n, k * p_count, max_batch, fixed)
    rows = pass_rows(k * p_count, max_batch) if fixed else None  # padded rows of every pass
    batch = None
    if fwd.engine is None:  # an engine never materialises full copies: no buffer for them
        most = max((b - a for a, b in spans), default=1) if rows is None else rows
        batch = OccludedBatch(x, grid, most, fwd.channels_last)
    out = torch.empty((n * k * p_count, tgt.shape[1]), dtype=torch.float32, device=x.device)
    for q0, q1 in spans:
        q = torch.arange(q0, q1, device=x.device)  # (B,)
        img, draw, win = q // (k * p_count), (q // p_count) % k, q % p_count
        s = fwd.occluded(x, base, grid, batch, img, draw, win, rows).gather(1, tgt[img])  # (B, T)
        out[q0:q1] = score0[img] - s
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
