"""The one home of every occlusion default.

``OcclusionConfig`` (the YAML ``occlusion:`` section), :func:`pipeline.attribute` and
:class:`~pipeline.kernel.options.ComputeOptions` all take their defaults from here, so a run and
the Python API with the same settings compute the same maps (a test compares the three).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from enum import Enum

__all__ = [
    "APPROX_CHECK_WINDOWS",
    "APPROX_THRESHOLD",
    "BASELINE",
    "BLUR_SIGMA",
    "CHANNELS_LAST",
    "COMPILE",
    "ENGINE",
    "MAX_BATCH",
    "MAX_BATCH_CPU_FULL",
    "MAX_BATCH_OTHER",
    "MODE",
    "N_BASELINES",
    "PRECISION",
    "SEED",
    "STRIDE",
    "VALUE",
    "WINDOW",
    "Baseline",
    "Engine",
    "Mode",
    "Precision",
    "check_blur_sigma",
    "check_check_windows",
    "default_draws",
    "default_stride",
]


class _Option(str, Enum):
    def __str__(self) -> str:  # messages and f-strings show the YAML spelling
        return str(self.value)


class Baseline(_Option):
    """How to fill an occluded window (values are pixel-space, [0, 1] RGB)."""

    RANDOM_PIXEL = "random-pixel"  # colour of one random pixel of the image, per draw
    RANDOM_CHANNEL = "random-channel"  # each channel from an independent random pixel, per draw
    MEAN = "mean"  # per-channel image mean
    ZERO = "zero"  # black
    CONSTANT = "constant"  # a value or a per-channel vector
    BLUR = "blur"  # the Gaussian-blurred image
    NOISE = "noise"  # uniform noise in [0, 1], per draw

    @property
    def is_random(self) -> bool:
        return self in (Baseline.RANDOM_PIXEL, Baseline.RANDOM_CHANNEL, Baseline.NOISE)


class Mode(_Option):
    """What occluding a window means."""

    FILL = "fill"  # the window's pixels are replaced by a baseline (K draws)
    # the patch tokens under the window are removed from a ViT's sequence: no fill value, so no
    # missingness bias from one (Jain, Salman et al., "Missingness Bias in Model Debugging",
    # ICLR 2022, https://arxiv.org/abs/2204.08945); K = 1
    TOKEN_DROP = "token-drop"

    @property
    def unused_settings(self) -> tuple[str, ...]:
        """The ``occlusion`` settings this mode ignores: token-drop has no baseline to fill."""
        return ("baseline", "value", "blur_sigma") if self is Mode.TOKEN_DROP else ()


class Precision(_Option):
    """Arithmetic of the forward passes: fp32, or bf16/fp16 autocast (CUDA)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class Engine(_Option):
    """How occluded scores are computed."""

    AUTO = "auto"  # incremental where the model allows it, else generic
    GENERIC = "generic"  # a full forward pass per occluded copy
    INCREMENTAL = "incremental"  # recompute only what a window changes; error if unsupported
    # incremental with each layer's changed region capped (Krypton's projective-field
    # thresholding): faster on deep nets, maps approximate, error measured per image
    APPROXIMATE = "approximate"


MODE = Mode.FILL
WINDOW: tuple[int, ...] = (32, 32)  # [h, w] across all channels, pixels
STRIDE: tuple[int, ...] | None = None  # None: half the window (default_stride)
BASELINE = Baseline.RANDOM_PIXEL
N_BASELINES: int | None = None  # None: default_draws(baseline)
SEED = 0
VALUE: float | tuple[float, ...] = 0.0  # fill of the constant baseline
BLUR_SIGMA = 5.0  # Gaussian sigma of the blur baseline, pixels
PRECISION = Precision.FP32
MAX_BATCH: int | None = None  # None: pipeline.kernel.options.default_max_batch, of these two:
MAX_BATCH_CPU_FULL = 32  # full forward passes on CPU
MAX_BATCH_OTHER = 256  # on GPUs, and through an engine (its calls are small crops)
# Channels-last input makes full passes of a CNN about 2x faster on CPU, but a model that calls
# .view() on a conv output fails with it. None (auto): full passes use it when a probe shows the
# model accepts it and computes the same scores (pipeline.kernel.forward.accepts_channels_last).
CHANNELS_LAST: bool | None = None
ENGINE = Engine.AUTO
# torch.compile (inductor) for the model's full forward passes: 1.4x faster full passes of the
# seed-shaped CNN on a 2-core CPU, at a compile of seconds to minutes per process and a C++
# compiler (CPU) or Triton (CUDA) on the worker. Off until a user asks for it.
COMPILE = False
# Engine.APPROXIMATE: the side of each layer's recomputed region is at most this fraction of
# that layer's output side (tau in (0, 1]; 1 is exact; smaller is faster and less accurate).
APPROX_THRESHOLD = 0.4
# Engine.APPROXIMATE: windows per image, drawn uniformly (seeded by seed and image id), whose
# exact score is also computed; the largest difference is the image's approx_error (0: not
# measured). With n windows it is at least the q-quantile of the image's window errors with
# probability 1 - q^n (pipeline.kernel.approx_check): 29 is the fewest for the 90th percentile
# at 95%. 4 said only "above the 47th percentile" and understated ResNet-50's largest error ~2x.
# Cost: 29 exact windows per image (measured in README, "Approximate engine").
APPROX_CHECK_WINDOWS = 29


def check_check_windows(count: int) -> int:
    """``approx_check_windows`` as an int if it is an integer >= 0 (0: no error measured).

    Raises:
        ValueError: naming ``approx_check_windows``, for a negative number, a bool, a float
            such as 1.5 or a string.
    """
    try:
        checks = operator.index(count)  # ints only, not 1.5 or "4"
    except TypeError:
        checks = -1
    if isinstance(count, bool) or checks < 0:
        raise ValueError(f"approx_check_windows must be an integer >= 0, got {count!r}")
    return checks


def check_blur_sigma(sigma: float) -> float:
    """The blur baseline's sigma if it is a finite number of pixels > 0.

    Raises:
        ValueError: zero, negative, NaN or infinite (a zero sigma divides by zero).
    """
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"blur_sigma must be a finite number of pixels > 0, got {sigma!r}")
    return float(sigma)


def default_draws(kind: Baseline | str) -> int:
    """Default number of draws ``K``: 3 for random baselines, 1 for fixed ones."""
    return 3 if Baseline(kind).is_random else 1


def default_stride(window: Sequence[int]) -> tuple[int, ...]:
    """Half the window's height and width (at least 1 pixel), so windows overlap by half; a
    ``[c, h, w]`` window steps by its whole channel extent."""
    w = tuple(int(v) for v in window)
    half = tuple(max(1, v // 2) for v in w[-2:])
    return (w[0], *half) if len(w) == 3 else half
