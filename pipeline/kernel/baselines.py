"""Baselines: what an occluded window is filled with.

A fixed baseline (``zero``, ``constant``, ``mean``, ``blur``) gives one fill per image. Random
baselines give ``K`` draws per image from a generator seeded by ``(seed, image_id)`` alone, so a
map never depends on sharding, batch composition, retries or device. The stored map is the mean
over draws (Zeiler & Fergus 2014 occlusion; averaging over baselines reduces the bias any single
fill value puts into the map).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipeline.kernel import defaults
from pipeline.kernel.defaults import Baseline, check_blur_sigma

__all__ = ["draw_generator", "gaussian_blur", "make_baselines"]


def draw_generator(seed: int, image_id: str) -> torch.Generator:
    """A CPU generator seeded from ``(seed, image_id)`` only (stable across processes)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{image_id}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding. ``(N, C, H, W) -> (N, C, H, W)``."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=images.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).to(images.dtype)
    c = images.shape[1]
    h, w = images.shape[-2:]
    # Reflect padding needs pad < size; fall back to replicate on tiny images.
    mode = "reflect" if radius < min(h, w) else "replicate"
    out = F.pad(images, (radius, radius, 0, 0), mode=mode)
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode=mode)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def make_baselines(
    images: torch.Tensor,
    kind: Baseline | str,
    n_baselines: int,
    *,
    seed: int = 0,
    image_ids: Sequence[str],
    value: float | Sequence[float] | torch.Tensor | None = defaults.VALUE,
    blur_sigma: float = defaults.BLUR_SIGMA,
) -> torch.Tensor:
    """Build the fill values of every image and draw.

    Args:
        images: ``(N, C, H, W)`` pixel-space images.
        kind: a :class:`Baseline`.
        n_baselines: ``K``; must be 1 for fixed baselines.
        seed: run seed; with ``image_ids`` it fully determines random draws.
        image_ids: ``N`` stable identifiers.
        value: for ``constant``: a scalar, a ``(C,)`` vector, a ``(C, H, W)`` tensor or an
            ``(N, C, H, W)`` tensor.
        blur_sigma: Gaussian sigma in pixels for ``blur``.

    Returns:
        ``(N, K, C, 1, 1)`` for colour fills (broadcasts over the window) or ``(N, K, C, H, W)``
        for per-pixel fills, on ``images.device`` in ``images.dtype``.
    """
    kind = Baseline(kind)
    if kind is Baseline.BLUR:
        check_blur_sigma(blur_sigma)
    n, c, h, w = images.shape
    if len(image_ids) != n:
        raise ValueError(f"got {len(image_ids)} image_ids for {n} images")
    if n_baselines < 1:
        raise ValueError(f"n_baselines must be >= 1, got {n_baselines}")
    if not kind.is_random and n_baselines != 1:
        raise ValueError(
            f"baseline {kind.value!r} is deterministic: n_baselines must be 1, got {n_baselines}"
        )
    dev, dt = images.device, images.dtype
    if kind is Baseline.ZERO:
        return torch.zeros((n, 1, c, 1, 1), device=dev, dtype=dt)
    if kind is Baseline.CONSTANT:
        if value is None:
            raise ValueError("baseline 'constant' needs a value (scalar or per-channel list)")
        v = torch.as_tensor(value, dtype=dt, device=dev)
        if v.dim() == 0:
            return v.expand(n, 1, c, 1, 1)
        if v.dim() == 1:
            if v.numel() != c:
                raise ValueError(f"constant baseline has {v.numel()} values for {c} channels")
            return v.view(1, 1, c, 1, 1).expand(n, 1, c, 1, 1)
        if v.dim() in (3, 4) and tuple(v.shape[-3:]) == (c, h, w):
            return v.expand(n, c, h, w).unsqueeze(1)
        raise ValueError(f"constant baseline of shape {tuple(v.shape)} does not fit {(c, h, w)}")
    if kind is Baseline.MEAN:
        return images.mean(dim=(2, 3)).view(n, 1, c, 1, 1)
    if kind is Baseline.BLUR:
        return gaussian_blur(images, blur_sigma).unsqueeze(1)
    gens = [draw_generator(seed, str(i)) for i in image_ids]
    if kind is Baseline.NOISE:
        noise = [torch.rand((n_baselines, c, h, w), generator=g) for g in gens]
        return torch.stack(noise).to(device=dev, dtype=dt)
    # Random pixels: indices are drawn on the CPU generator so that they do not depend on the
    # device; the gather happens on the device.
    per_pixel = 1 if kind is Baseline.RANDOM_PIXEL else c
    idx = torch.stack(
        [torch.randint(0, h * w, (n_baselines, per_pixel), generator=g) for g in gens]
    )
    idx = idx.expand(n, n_baselines, c).to(dev)  # (N, K, C)
    flat = images.reshape(n, 1, c, h * w).expand(n, n_baselines, c, h * w)
    return flat.gather(3, idx.unsqueeze(-1)).view(n, n_baselines, c, 1, 1)
