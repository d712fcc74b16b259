"""Token-drop occlusion (``mode="token-drop"``): the patch tokens under a window are removed.

Filling a window with a baseline colour shows the model an input it never saw, and the map then
measures that colour as much as the pixels it hid (missingness bias). A ViT can instead be run
without the window's tokens, which removes the bias (Jain, Salman et al., "Missingness Bias in
Model Debugging", ICLR 2022, https://arxiv.org/abs/2204.08945). ``delta = f_t(x) - f_t(x
without the tokens under the window)``; there is no baseline, so ``K = 1``.

The kernel only needs a :class:`TokenModel`: the model with a ``forward_kept`` that runs it on
a chosen subset of its patch tokens. Which library models have one, and how, is decided above
the kernel (:func:`pipeline.incremental.tokens.token_model`). Windows must lie on the patch grid;
copies that keep the same number of tokens share a pass (a window clipped at the image edge
removes fewer tokens). Plain torch.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from pipeline.kernel.defaults import Engine
from pipeline.kernel.forward import Forward
from pipeline.kernel.geometry import WindowGrid
from pipeline.kernel.options import precision_context
from pipeline.kernel.passes import pass_rows, pass_spans
from pipeline.kernel.targets import output_scores

__all__ = ["TokenModel", "check_token_grid", "check_token_mode", "kept_tokens", "token_deltas"]


@runtime_checkable
class TokenModel(Protocol):
    """A ViT that can run on a subset of its patch tokens.

    Attributes:
        patch_size: ``(ph, pw)`` pixels per patch token.
        grid: ``(Gh, Gw)`` patch tokens of the images the model takes; None when it takes any
            whole number of patches (a dynamic image size).
    """

    patch_size: tuple[int, int]
    grid: tuple[int, int] | None

    def __call__(self, images: torch.Tensor) -> Any:
        """The model's output for ``(B, C, H, W)`` pixel-space images, all tokens kept."""
        ...

    def forward_kept(self, images: torch.Tensor, keep: torch.Tensor) -> Any:
        """The model's output for ``(B, C, H, W)`` images when only the patch tokens ``keep``
        ``(B, L)`` (int64 indices into the row-major ``Gh * Gw`` grid) are kept. Class and
        register tokens are always kept, and each kept token keeps its own position
        embedding."""
        ...


def _multiple(value: int, patch: int) -> int:
    return max(patch, round(value / patch) * patch)


def check_token_grid(grid: WindowGrid, model: TokenModel) -> tuple[int, int]:
    """The ``(Gh, Gw)`` token grid of ``grid``'s images, if its windows lie on ``model``'s patch
    grid.

    Raises:
        ValueError: one line naming the setting (``occlusion.window``, ``occlusion.stride``,
            ``dataset.image_size``) and the patch size, with a value that fits.
    """
    (ph, pw), (c, h, w) = model.patch_size, grid.image
    if grid.window[0] != c:
        raise ValueError(
            f"occlusion.window {list(grid.window)} covers {grid.window[0]} of {c} channels; a "
            "token holds every channel, so token-drop windows are [h, w]"
        )
    if h % ph or w % pw:
        raise ValueError(
            f"dataset.image_size [{h}, {w}] is not a whole number of the model's {ph}x{pw} "
            f"patches; use [{_multiple(h, ph)}, {_multiple(w, pw)}]"
        )
    tokens = (h // ph, w // pw)
    if model.grid is not None and tuple(model.grid) != tokens:
        gh, gw = model.grid
        raise ValueError(
            f"dataset.image_size [{h}, {w}] gives {tokens[0]}x{tokens[1]} patch tokens; the "
            f"model takes {gh}x{gw} ([{gh * ph}, {gw * pw}] pixels)"
        )
    for key, (sh, sw) in (("window", grid.window[1:]), ("stride", grid.stride[1:])):
        if sh % ph or sw % pw:
            raise ValueError(
                f"occlusion.{key} [{sh}, {sw}] must be a multiple of the model's patch size "
                f"{ph}x{pw} in token-drop mode (the tokens under a window are removed); use "
                f"[{_multiple(sh, ph)}, {_multiple(sw, pw)}]"
            )
    return tokens


def kept_tokens(grid: WindowGrid, patch: tuple[int, int]) -> list[torch.Tensor]:
    """The patch tokens each window keeps.

    Args:
        grid: window geometry whose windows lie on the patch grid (:func:`check_token_grid`).
        patch: ``(ph, pw)`` pixels per token.

    Returns:
        ``P`` int64 tensors (row-major grid order of windows), each the ascending indices of
        the tokens outside that window in the row-major ``Gh * Gw`` token grid.
    """
    (ph, pw), (_, h, w) = patch, grid.image
    keep = []
    for _, _, y0, y1, x0, x1 in grid.boxes().tolist():
        kept = torch.ones((h // ph, w // pw), dtype=torch.bool)  # (Gh, Gw)
        kept[y0 // ph : y1 // ph, x0 // pw : x1 // pw] = False
        keep.append(torch.nonzero(kept.flatten()).flatten())
    return keep


def token_deltas(
    fwd: Forward,
    model: TokenModel,
    x: torch.Tensor,
    grid: WindowGrid,
    tgt: torch.Tensor,
    score0: torch.Tensor,
    max_batch: int,
) -> torch.Tensor:
    """Score drops of every (image, window) copy with the window's tokens removed.

    Windows are grouped by the number of tokens they keep, shortest first; within a group,
    copies are enumerated image-major and go through ``model.forward_kept`` ``max_batch`` at a
    time, or under ``fwd.fixed_batch`` in passes of ``pass_rows(P_L, max_batch)`` rows (as full
    passes are, :mod:`pipeline.kernel.passes`, with the group's ``P_L`` windows as the copies per
    image), so every pass holds sequences of one length and a copy's pass has the same shape
    however images are grouped.

    Args:
        fwd: the kernel's :class:`~pipeline.kernel.forward.Forward` (precision, memory format,
            task, score, fixed batch).
        model: the token model.
        x: ``(N, C, H, W)`` images on the device.
        grid: window geometry on the patch grid.
        tgt: ``(N, T)`` target indices.
        score0: ``(N, T)`` unoccluded scores.
        max_batch: copies per pass.

    Returns:
        ``(N, 1, T, P)`` float32 deltas (one draw).
    """
    n, t, p_count = x.shape[0], tgt.shape[1], grid.n_windows
    keeps = kept_tokens(grid, model.patch_size)
    groups: dict[int, list[int]] = {}
    for p, keep in enumerate(keeps):
        groups.setdefault(keep.numel(), []).append(p)
    fixed = fwd.fixed_batch is not None
    # the largest pass; under fixed_batch each group's passes have pass_rows(P_L, max_batch)
    # rows, the same for every image of a run since every image has the same windows
    if fixed:
        rows = max(pass_rows(len(g), max_batch) for g in groups.values())
    else:
        rows = min(max_batch, n * p_count)
    fmt = torch.channels_last if fwd.channels_last else torch.contiguous_format
    # one reused input buffer: no fresh pages per pass (as pipeline.kernel.forward.OccludedBatch)
    buf = torch.empty((rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
    buf = buf.contiguous(memory_format=fmt)  # (rows, C, H, W)
    out = torch.empty((n, t, p_count), dtype=torch.float32, device=x.device)
    for length in sorted(groups):
        wins = torch.tensor(groups[length], device=x.device)  # (P_L,)
        keep = torch.stack([keeps[p] for p in groups[length]]).to(x.device)  # (P_L, L)
        pad = pass_rows(wins.numel(), max_batch) if fixed else None
        for q0, q1 in pass_spans(n, wins.numel(), max_batch, fixed):
            q = torch.arange(q0, q1, device=x.device)  # (B,)
            img, j = q // wins.numel(), q % wins.numel()
            s = _kept_scores(fwd, model, x, buf, img, keep[j], pad).gather(1, tgt[img])  # (B, T)
            out[img, :, wins[j]] = score0[img] - s
    return out[:, None]


def _kept_scores(
    fwd: Forward,
    model: TokenModel,
    x: torch.Tensor,
    buf: torch.Tensor,
    img: torch.Tensor,
    keep: torch.Tensor,
    rows: int | None,
) -> torch.Tensor:
    """Scores ``(B, O)`` of images ``x[img]`` keeping the tokens ``keep`` ``(B, L)``, the pass
    padded to ``rows`` copies when given."""
    b = img.shape[0]
    if rows is not None and b < rows:
        # every pass of a group the same size, repeating a real copy (bitwise reproducibility)
        pad = rows - b
        img = torch.cat([img, img[:1].expand(pad)])
        keep = torch.cat([keep, keep[:1].expand(pad, -1)])
    images = buf[: img.shape[0]]
    torch.index_select(x, 0, img, out=images)  # (B, C, H, W), the images themselves
    with precision_context(fwd.device, fwd.precision):
        raw = model.forward_kept(images, keep)
    return output_scores(raw, img.shape[0], fwd.task, fwd.score)[:b]


def check_token_mode(model: Any, n_baselines: int | None, engine: Any) -> TokenModel:
    """``model`` as a :class:`TokenModel` for the kernel's ``mode="token-drop"``.

    Raises:
        ValueError: ``model`` has no ``forward_kept`` (:func:`pipeline.attribute` builds one
            for the ViT families it knows), ``n_baselines`` is not 1 or None, or an engine
            other than ``generic`` was given.
    """
    if not isinstance(model, TokenModel):
        raise ValueError(
            f"mode 'token-drop' needs a model with patch_size, grid and forward_kept; "
            f"{type(model).__name__} has none: call pipeline.attribute, which builds them for "
            "timm, torchvision and Hugging Face ViTs"
        )
    if n_baselines not in (None, 1):
        raise ValueError(
            f"n_baselines must be 1 in token-drop mode (there is no baseline), got {n_baselines}"
        )
    if engine is not Engine.GENERIC:
        raise ValueError(
            f"mode 'token-drop' computes through the model's tokens; options.engine must be "
            f"generic, got {engine}"
        )
    return model
