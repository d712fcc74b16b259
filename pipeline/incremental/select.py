"""Choosing how occluded scores are computed, and the public :func:`attribute`.

The one place where an engine choice (``auto``, ``generic``, ``incremental``, ``approximate``)
becomes an engine object for a model, where ``mode="token-drop"`` turns a ViT into its token
model (:func:`pipeline.incremental.tokens.token_model`), and where the kernel's options are
resolved for it (:func:`resolve_compute`). :func:`attribute`, the package's public entry point,
and every worker (:func:`pipeline.run.settings.worker_compute`) go through it, so the Python API
and a run given the same settings compute the same maps, bit for bit. The kernel itself
(:func:`pipeline.kernel.occlusion.occlude`) only computes with what it is given.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from pipeline.incremental.approximate import ApproximateEngine
from pipeline.incremental.engine import auto_engine
from pipeline.incremental.tokens import token_model
from pipeline.kernel import defaults
from pipeline.kernel.approx_check import error_meaning
from pipeline.kernel.defaults import Engine, Mode
from pipeline.kernel.forward import resolve_options
from pipeline.kernel.occlusion import OcclusionResult, model_device, occlude
from pipeline.kernel.options import ComputeOptions, OccludedEngine, check_threshold

__all__ = ["Compute", "attribute", "resolve_compute", "select_engine"]


@dataclass(frozen=True)
class Compute:
    """Options resolved for one model: what the kernel computes with, and which engine."""

    options: ComputeOptions  # engine: an object or generic; max_batch, channels_last decided
    # "incremental" | "approximate" | "generic" | "token-drop" | an engine object's name
    engine_name: str
    engine_note: str  # why that engine
    # what the kernel calls: the model itself, or under token-drop its token model (which calls
    # the model for unoccluded passes)
    model: Any = field(default=None, repr=False, compare=False)


def select_engine(
    choice: Engine | OccludedEngine | str | None,
    model: Any,
    image_shape: Sequence[int],
    device: torch.device | str,
    threshold: float = defaults.APPROX_THRESHOLD,
) -> tuple[OccludedEngine | None, str]:
    """The engine object for ``choice``, and a note saying which path was taken and why.

    Args:
        choice: ``auto`` (incremental where the model allows it), ``generic`` (full forward
            passes), ``incremental`` (an error when the model does not allow it),
            ``approximate`` (incremental with projective fields capped at ``threshold``; an
            error when the model does not allow incremental inference), or an engine object,
            returned as it is.
        model: the pixel-space model.
        image_shape: ``(C, H, W)`` of the images, pixels.
        device: where the model runs.
        threshold: ``approximate`` only: tau in (0, 1], the largest side of each layer's
            recomputed region as a fraction of that layer's output side.

    Returns:
        ``(engine, note)``; ``engine`` is None for full forward passes.

    Raises:
        ValueError: ``incremental`` or ``approximate`` was asked for and the model does not
            allow incremental inference, or ``threshold`` is not in (0, 1].
    """
    if isinstance(choice, str):
        choice = Engine(choice)
    if choice is None or choice is Engine.GENERIC:
        return None, "generic engine requested"
    if not isinstance(choice, Engine):
        return choice, f"engine object {type(choice).__name__}"
    if choice is Engine.APPROXIMATE:
        tau = check_threshold(threshold)
        approx, reason = ApproximateEngine.build_or_reason(model, image_shape, device, tau)
        if approx is None:
            raise ValueError(
                f"engine 'approximate' was asked for but the model does not allow incremental "
                f"inference: {reason}"
            )
        note = f"approximate: projective fields capped at tau={tau:g}"
        if approx.frozen_gates:
            note += (
                "; squeeze-excitation gates frozen at the unoccluded image's values (check "
                "windows scored by full forward passes)"
            )
        return approx, note
    engine, reason = auto_engine(model, tuple(image_shape), device)
    if engine is None and choice is Engine.INCREMENTAL:
        raise ValueError(
            f"engine '{choice}' was asked for but the model does not allow incremental "
            f"inference: {reason}"
        )
    return engine, reason or "incremental: the model's trunk is local"


def resolve_compute(
    options: ComputeOptions,
    model: Any,
    image_shape: Sequence[int],
    device: torch.device | str,
    mode: Mode | str = defaults.MODE,
) -> Compute:
    """``options`` resolved for ``model``: the engine chosen (under ``mode="token-drop"`` the
    model's token model instead), then ``max_batch`` and ``channels_last`` decided
    (:func:`pipeline.kernel.forward.resolve_options`). Pass ``Compute.model`` to the kernel. An
    approximate engine's note also says what its ``approx_error`` means
    (:func:`pipeline.kernel.approx_check.error_meaning`).

    Raises:
        ValueError: see :func:`select_engine`; under token-drop, a model that is no known ViT
            (naming its class) or an engine other than ``auto`` or ``generic``.
    """
    device = torch.device(device)
    if Mode(mode) is Mode.TOKEN_DROP:
        return _token_compute(options, model, image_shape, device)
    engine, note = select_engine(
        options.engine, model, image_shape, device, options.approx_threshold
    )
    chosen = replace(options, engine=Engine.GENERIC if engine is None else engine)
    resolved = resolve_options(chosen, model, tuple(image_shape), device)
    name = "generic" if engine is None else str(getattr(engine, "name", "incremental"))
    if isinstance(engine, ApproximateEngine):  # run.json's notes say what approx_error means
        note = f"{note}; {error_meaning(options.approx_check_windows)}"
    return Compute(resolved, name, note, model)


def _token_compute(
    options: ComputeOptions, model: Any, image_shape: Sequence[int], device: torch.device
) -> Compute:
    """:func:`resolve_compute` under ``mode="token-drop"``: no engine, the token model."""
    if options.engine not in (Engine.AUTO, Engine.GENERIC):
        raise ValueError(
            f"engine '{options.engine}' does not apply to mode 'token-drop' (the model runs on "
            "fewer tokens, not on filled pixels); use engine auto or generic"
        )
    tokens = token_model(model)
    chosen = replace(options, engine=Engine.GENERIC)  # the unoccluded passes are plain ones
    resolved = resolve_options(chosen, tokens, tuple(image_shape), device)
    (ph, pw), family = tokens.patch_size, getattr(tokens, "family", type(tokens).__name__)
    note = f"token-drop: {family}, {ph}x{pw} patches; the tokens under a window removed"
    return Compute(resolved, "token-drop", note, tokens)


@functools.wraps(occlude, assigned=())  # the signature (inspect follows __wrapped__)
def attribute(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    *,
    options: ComputeOptions | None = None,
    **keywords: Any,
) -> OcclusionResult:
    """:func:`pipeline.kernel.occlusion.occlude` (same keywords, same result) with the engine of
    ``options`` (default: ``auto``, incremental where the model allows it) chosen for
    ``model`` first, and under ``mode="token-drop"`` the ViT's token model built
    (:func:`pipeline.incremental.tokens.token_model`)."""
    opts = ComputeOptions() if options is None else options
    if images.dim() == 4:  # else the kernel names the wrong shape
        device = model_device(model, images)
        mode = keywords.get("mode", defaults.MODE)
        resolved = resolve_compute(opts, model, images.shape[1:], device, mode)
        opts, model = resolved.options, resolved.model
    return occlude(model, images, options=opts, **keywords)
