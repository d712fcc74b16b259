"""The approximate engine's error statistic: seeded check windows and what their maximum means.

An approximate map of an image has, at each window ``p``, the error
``e_p = max over the K draws and T targets of |approximate - exact|`` score drop (score units).
Measuring ``e_p`` everywhere would cost the exact engine's whole map, so the kernel scores ``n``
check windows exactly, drawn uniformly at random without replacement from the ``P`` windows by a
generator seeded by ``(seed, image_id)`` alone, and stores ``approx_error = max e_p`` over them.

What that number means. Let ``Q_q`` be the ``q``-quantile of the image's ``P`` errors, the
``ceil(q P)``-th smallest (numpy's ``method="inverted_cdf"``). Fewer than ``q P`` windows have
``e_p < Q_q``, so ``n`` windows drawn without replacement all miss the rest with probability
``C(m, n) / C(P, n) <= (m / P)^n < q^n`` (``m`` the windows below ``Q_q``):

    P(approx_error >= Q_q) >= 1 - q^n.

``n = 29`` gives "at least the 90th percentile of the image's window errors with 95% confidence"
(``1 - 0.9^29 = 0.953``), ``n = 59`` the 95th percentile, ``n = 4`` only the 47th. With
``n >= P`` every window is checked and ``approx_error`` is the image's largest error. The
probability is over the draw of check windows, which the seed and the image id fix: across a
dataset, the statement holds on at least that share of the images in expectation. It is a
statement about the image's own window errors, not a bound on the largest one (Krypton,
Nakandala et al. SIGMOD 2019, reports quality as map SSIM; this is the per-image check a run
can afford).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from pipeline.kernel.baselines import draw_generator
from pipeline.kernel.forward import Forward
from pipeline.kernel.geometry import WindowGrid
from pipeline.kernel.passes import pass_rows, pass_spans

__all__ = [
    "CONFIDENCE",
    "approx_error",
    "check_windows",
    "covered_quantile",
    "error_meaning",
    "miss_probability",
]

#: The confidence at which the stored error's quantile is stated (docs, run.json, bench).
CONFIDENCE = 0.95


def miss_probability(count: int, q: float) -> float:
    """Upper bound on ``P(approx_error < Q_q)`` with ``count`` check windows: ``q ** count``
    (1 with no check window)."""
    return float(q) ** int(count)


def covered_quantile(count: int, confidence: float = CONFIDENCE) -> float:
    """The largest ``q``, rounded down to 0.01, such that ``count`` check windows put
    ``approx_error`` at or above the image's ``q``-quantile with probability >= ``confidence``.

    Example:
        >>> covered_quantile(29), covered_quantile(59), covered_quantile(4)
        (0.9, 0.95, 0.47)
    """
    if count < 1:
        return 0.0
    # (1 - confidence) ** (1 / count), rounded down so that the stated q keeps the confidence
    return math.floor(100 * (1.0 - confidence) ** (1.0 / count) + 1e-9) / 100


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def error_meaning(count: int) -> str:
    """One line saying what ``approx_error`` is with ``count`` check windows per image, as
    ``run.json``'s engine notes and the bench print it.

    Example:
        >>> error_meaning(29)[:60]
        'approx_error = largest |approximate - exact| score drop on 2'
    """
    if count < 1:
        return "approx_error not measured (approx_check_windows: 0)"
    q = covered_quantile(count)
    return (
        f"approx_error = largest |approximate - exact| score drop on {count} check windows per "
        f"image (uniform, seeded by seed and image id): at least the {_ordinal(round(100 * q))} "
        f"percentile of the image's window errors with probability >= "
        f"{1 - miss_probability(count, q):.3f} (1 - {q:.2f}^{count}); the largest error when the "
        f"image has at most {count} windows"
    )


def check_windows(n_windows: int, count: int, image_ids: Sequence[str], seed: int) -> torch.Tensor:
    """Windows of each image whose exact score measures an approximate engine's error.

    Drawn uniformly without replacement from a generator seeded by ``(seed, image_id)`` alone
    (apart from the baseline draws'), so they do not depend on batching, sharding or the other
    images; the first ``c`` of ``count`` windows are those ``c`` check windows would draw.

    Args:
        n_windows: ``P``, windows per image.
        count: windows wanted per image; all ``P`` when ``count >= P``.
        image_ids: the ``N`` image ids.
        seed: the ``seed`` of :func:`pipeline.kernel.occlusion.occlude`.

    Returns:
        ``(N, min(count, P))`` int64 window indices (row-major grid order), ascending per row.
    """
    s = min(int(count), int(n_windows))
    rows = [
        torch.randperm(n_windows, generator=draw_generator(seed, f"{i}\x00approx-check"))[:s]
        for i in image_ids
    ]
    if not rows:
        return torch.zeros((0, s), dtype=torch.int64)
    return torch.stack(rows).sort(dim=1).values


def approx_error(
    exact: Forward,
    x: torch.Tensor,
    base: torch.Tensor,
    grid: WindowGrid,
    tgt: torch.Tensor,
    score0: torch.Tensor,
    deltas: torch.Tensor,
    wins: torch.Tensor,
    max_batch: int,
) -> torch.Tensor:
    """``(N,)`` largest ``|deltas - exact deltas|`` over the windows ``wins`` ``(N, S)``, the
    draws and the targets (score units).

    Args:
        exact: forward passes through the exact engine.
        x: ``(N, C, H, W)`` images; ``base``: their ``(N, K, C, 1|H, 1|W)`` baselines.
        grid: the window geometry.
        tgt: ``(N, T)`` target indices; ``score0``: ``(N, T)`` unoccluded scores.
        deltas: ``(N, K, T, P)`` the approximate engine's score drops.
        wins: ``(N, S)`` check windows (:func:`check_windows`).
        max_batch: the most copies per pass.

    Returns:
        ``(N,)`` float32; NaN/Inf differences count as 0 (the kernel flags those images).
    """
    n, k, t = deltas.shape[:3]
    s = wins.shape[1]
    # The N * K * S check copies go image-major through the map's kind of passes
    # (pipeline.kernel.passes), with K * S copies per image: each pass costs a fixed overhead
    # per op, so one pass per image made 29 check windows of a 225-window map cost +66% on a
    # small ResNet on a busy CPU. Under fixed_batch the pass size follows K * S, not the number
    # of images, so an image's approx_error is bitwise the same in any call.
    total = n * k * s
    fixed = exact.fixed_batch is not None
    rows = pass_rows(k * s, max_batch) if fixed else None  # wins: s >= 1 per image
    got = torch.empty((total, t), dtype=torch.float32, device=x.device)
    for q0, q1 in pass_spans(n, k * s, max_batch, fixed):
        q = torch.arange(q0, q1, device=x.device)  # (B,)
        img, draw, j = q // (k * s), (q // s) % k, q % s
        out = exact.occluded(x, base, grid, None, img, draw, wins[img, j], rows)  # (B, O)
        got[q0:q1] = score0[img] - out.gather(1, tgt[img])
    ref = got.view(n, k, s, t).permute(0, 1, 3, 2)  # (N, K, T, S)
    approx = deltas.gather(3, wins[:, None, None, :].expand(n, k, t, s))
    diff = torch.nan_to_num((approx - ref).abs(), nan=0.0, posinf=0.0, neginf=0.0)
    return diff.flatten(1).amax(dim=1) if diff.numel() else diff.new_zeros(n)
