"""How the kernel computes: batch size, precision, memory format and engine.

What a map *is* (window, stride, baseline, draws, target) is given to :func:`pipeline.attribute`
as keywords; how it is computed is one :class:`ComputeOptions`. The public API and every worker
resolve options the same way (:func:`pipeline.incremental.select.resolve_compute`), so the
Python API given the same options computes the same maps as a run, bit for bit.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from pipeline.kernel import defaults
from pipeline.kernel.defaults import Engine, Precision, check_check_windows

__all__ = [
    "ComputeOptions",
    "OccludedEngine",
    "check_threshold",
    "default_max_batch",
    "precision_context",
]

_AUTOCAST = {Precision.FP32: None, Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


class OccludedEngine(Protocol):
    """Computes the raw model outputs of occluded copies without materialising them."""

    def forward_occluded(
        self,
        x: torch.Tensor,
        fill: torch.Tensor,
        grid: Any,
        img: torch.Tensor,
        draw: torch.Tensor,
        win: torch.Tensor,
    ) -> torch.Tensor:
        """``(B, ...)`` outputs of copies ``(img[b], draw[b], win[b])`` of images ``x``."""
        ...


@dataclass(frozen=True)
class ComputeOptions:
    """How :func:`pipeline.attribute` computes. None of these change a map beyond rounding,
    except ``engine="approximate"``, whose maps are approximate (its error is measured and
    returned as :attr:`~pipeline.kernel.occlusion.OcclusionResult.approx_error`).

    Example:
        >>> ComputeOptions(max_batch=64, engine="generic").engine
        <Engine.GENERIC: 'generic'>
    """

    max_batch: int | None = defaults.MAX_BATCH  # copies per pass; None: default_max_batch
    precision: Precision = defaults.PRECISION  # fp32, or bf16/fp16 autocast on CUDA
    # channels-last input for full passes; None: when the model accepts it (a probe, cached)
    channels_last: bool | None = defaults.CHANNELS_LAST
    engine: Engine | OccludedEngine = defaults.ENGINE  # a choice, or an engine object
    # full forward passes through torch.compile(model) (pipeline.kernel.compiled); an engine's
    # own layer-by-layer passes stay eager
    compile: bool = defaults.COMPILE
    # Give every pass a size that depends only on run-wide constants, padding the short ones:
    # occluded passes fit the copies per image (pipeline.kernel.passes.pass_rows), unoccluded
    # ones hold min(max_batch, 16) images; maps are then bitwise identical however images are
    # grouped into calls.
    fixed_batch: bool = False
    on_nonfinite: str = "raise"  # "raise" on a NaN/Inf score, or "nan": NaN maps, finite=False
    # engine="approximate": largest side of each layer's recomputed region, as a fraction of
    # that layer's output side, in (0, 1] (1: exact). An engine object carries its own.
    approx_threshold: float = defaults.APPROX_THRESHOLD
    # approximate engines: windows per image, drawn uniformly (seeded by seed and image id),
    # whose exact score is also computed to measure the error (0: not measured, approx_error
    # is None); pipeline.kernel.approx_check says what the measured maximum means
    approx_check_windows: int = defaults.APPROX_CHECK_WINDOWS

    def __post_init__(self) -> None:
        if not isinstance(self.compile, bool):  # "no" would be truthy: compile on
            raise ValueError(f"compile must be True or False, got {self.compile!r}")
        object.__setattr__(self, "precision", Precision(self.precision))
        if isinstance(self.engine, str):
            object.__setattr__(self, "engine", Engine(self.engine))
        if self.max_batch is not None and int(self.max_batch) < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.on_nonfinite not in ("raise", "nan"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'nan', got {self.on_nonfinite!r}")
        check_threshold(self.approx_threshold)
        checks = check_check_windows(self.approx_check_windows)
        object.__setattr__(self, "approx_check_windows", checks)


def check_threshold(tau: float) -> float:
    """``tau`` as a float when it is a valid ``approx_threshold`` (in (0, 1]).

    Raises:
        ValueError: naming ``approx_threshold``, for anything else (NaN included).
    """
    try:
        value = float(tau)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(tau, bool) or not 0.0 < value <= 1.0:
        raise ValueError(
            f"approx_threshold must be in (0, 1] (a fraction of each layer's side), got {tau!r}"
        )
    return value


def precision_context(
    device: torch.device, precision: Precision | str
) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to the dtype of ``precision`` on ``device``; nothing for ``fp32``."""
    dtype = _AUTOCAST[Precision(precision)]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def default_max_batch(device: torch.device | str, engine: Any = None) -> int:
    """Occluded copies per forward pass when ``max_batch`` is not given.

    256 on GPUs and for an engine (the incremental engine's calls are small crops, so it wants
    many windows per call). 32 for full forward passes on CPU: 32 images already keep the cores
    busy, and larger batches only grow the activations past the caches (seed-shaped CNN at
    224x224 on 2 cores: 128 -> 32 cut peak RSS from 2.7 to 1.0 GiB at the same speed).
    """
    full_on_cpu = engine is None and torch.device(device).type == "cpu"
    return defaults.MAX_BATCH_CPU_FULL if full_on_cpu else defaults.MAX_BATCH_OTHER
