"""The sections of the audit configuration (docs/design.md, "Configuration"), one frozen
dataclass each.

Each ``__post_init__`` checks its own values and raises ``ConfigError`` with the key relative to
the section; ``pipeline.config.load.load_config`` adds the section's dotted prefix. Local paths are
made absolute here so that a config built in code behaves like one loaded from YAML.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from pipeline.config.dataset import (
    ColumnsConfig,
    DataFormat,
    DatasetConfig,
    NormalizeConfig,
    _local,
    _positive,
)
from pipeline.config.model import ModelConfig, Target
from pipeline.config.typed import fail
from pipeline.kernel import defaults
from pipeline.kernel.defaults import (
    Baseline,
    Engine,
    Mode,
    Precision,
    check_blur_sigma,
    check_check_windows,
    default_draws,
    default_stride,
)
from pipeline.kernel.options import check_threshold
from pipeline.storage.hub import HubFile
from pipeline.storage.paths import check_folder_uri

__all__ = [
    "AuditSettings",
    "ClusterConfig",
    "ColumnsConfig",
    "CounterfactualConfig",
    "DataFormat",
    "DatasetConfig",
    "Device",
    "Fill",
    "HubFile",
    "ModelConfig",
    "NormalizeConfig",
    "NotifyConfig",
    "OcclusionConfig",
    "OutputConfig",
    "Precision",
    "Target",
    "TrendConfig",
]


class _Option(str, enum.Enum):
    def __str__(self) -> str:  # messages and f-strings show the YAML spelling
        return str(self.value)


@dataclass(frozen=True)
class OcclusionConfig:
    """The occlusion sweep; pixels are those of the resized image. Defaults come from
    :mod:`pipeline.kernel.defaults`, which :func:`pipeline.attribute` uses too."""

    # fill: the window's pixels replaced by a baseline; token-drop: a ViT's patch tokens under
    # the window removed (no baseline, K = 1; window and stride on the patch grid)
    mode: Mode = defaults.MODE
    window: tuple[int, ...] = defaults.WINDOW  # [h, w] across all channels, or [c, h, w]
    stride: tuple[int, ...] | None = defaults.STRIDE  # like window; None: half the window
    baseline: Baseline = defaults.BASELINE
    value: float | tuple[float, ...] = defaults.VALUE  # constant baseline: one value or per channel
    blur_sigma: float = defaults.BLUR_SIGMA  # blur baseline: Gaussian sigma in pixels
    n_baselines: int | None = defaults.N_BASELINES  # K draws; None: 3 for random baselines, else 1
    seed: int = defaults.SEED  # with the image_id, seeds each image's draws
    precision: Precision = defaults.PRECISION  # bf16/fp16 on GPU only
    max_batch: int | None = (
        defaults.MAX_BATCH
    )  # copies per pass; None: 32 for CPU full passes, else 256
    engine: Engine = defaults.ENGINE  # how occluded scores are computed (maps agree to 1e-4)
    # channels-last input for full passes; null: when the model accepts it (a probe, cached)
    channels_last: bool | None = defaults.CHANNELS_LAST
    compile: bool = defaults.COMPILE  # full forward passes through torch.compile (inductor)
    # engine approximate: each layer's changed box is capped at this fraction of its side
    approx_threshold: float = defaults.APPROX_THRESHOLD
    # engine approximate: windows per image also scored exactly; approx_error is their largest
    # difference (pipeline.kernel.approx_check: what it means)
    approx_check_windows: int = defaults.APPROX_CHECK_WINDOWS

    @property
    def unused_settings(self) -> tuple[str, ...]:
        """The settings its ``mode`` ignores (``Mode.unused_settings``, kernel defaults)."""
        return Mode(self.mode).unused_settings

    def __post_init__(self) -> None:
        # a section built in code may spell options as strings, like the YAML does
        kinds = (
            ("mode", Mode),
            ("baseline", Baseline),
            ("precision", Precision),
            ("engine", Engine),
        )
        for key, kind in kinds:
            object.__setattr__(self, key, kind(getattr(self, key)))
        if len(self.window) not in (2, 3):
            fail("window", f"must be [h, w] or [c, h, w], got {list(self.window)!r}")
        if self.stride is None:
            object.__setattr__(self, "stride", default_stride(self.window))
        if len(self.stride) != len(self.window):
            fail(
                "stride",
                f"must have {len(self.window)} entries like window, got {list(self.stride)!r}",
            )
        for key in ("window", "stride"):
            if min(getattr(self, key)) < 1:
                fail(key, f"entries must be >= 1, got {list(getattr(self, key))!r}")
        if len(self.window) == 3 and self.window[0] > 3:
            fail("window", f"channel extent must be <= 3 (RGB), got {self.window[0]}")
        if isinstance(self.value, tuple) and len(self.value) not in (1, 3):
            fail("value", f"must be one value or 3 (per channel), got {list(self.value)!r}")
        try:
            check_blur_sigma(self.blur_sigma)
        except ValueError as e:
            fail("blur_sigma", str(e).removeprefix("blur_sigma "))
        k = self.n_baselines
        if self.mode is Mode.TOKEN_DROP:
            self._check_token_drop()
        elif k is None:
            object.__setattr__(self, "n_baselines", default_draws(self.baseline))
        elif k < 1:
            fail("n_baselines", f"must be >= 1, got {k}")
        elif k != 1 and not self.baseline.is_random:
            fail("n_baselines", f"must be 1 for the fixed baseline {self.baseline.value}, got {k}")
        if self.max_batch is not None:
            _positive("max_batch", self.max_batch)
        try:
            check_threshold(self.approx_threshold)
        except ValueError as e:
            fail("approx_threshold", str(e))
        try:
            check_check_windows(self.approx_check_windows)
        except ValueError as e:
            fail("approx_check_windows", str(e).removeprefix("approx_check_windows "))

    def _check_token_drop(self) -> None:
        """Token-drop has no baseline (one draw) and no engine; the patch grid is the model's,
        checked before the run (pipeline.run.preflight)."""
        k = self.n_baselines
        if k not in (None, 1):
            fail("n_baselines", f"must be 1 in token-drop mode (there is no baseline), got {k}")
        object.__setattr__(self, "n_baselines", 1)
        if self.engine in (Engine.INCREMENTAL, Engine.APPROXIMATE):
            fail(
                "engine",
                f"{self.engine} does not apply to mode token-drop (the model runs on fewer "
                "tokens, not on filled pixels); use auto or generic",
            )
        if len(self.window) == 3 and self.window[0] < 3:
            fail("window", f"a token holds every channel: use [h, w], got {list(self.window)}")


class Device(_Option):
    """What the actor pool computes on (docs/design.md, "Distribution")."""

    AUTO = "auto"  # GPUs when the cluster has or can start GPU nodes, else CPUs; says why
    CUDA = "cuda"  # GPU actors only; exit 2 when none comes up within startup_timeout_s
    CPU = "cpu"  # CPU actors only, also on a cluster with GPUs


@dataclass(frozen=True)
class ClusterConfig:
    """Where and how wide the run goes (docs/design.md, "Distribution")."""

    address: str = "local"  # local (embedded Ray) | auto | ray://host:10001 | http(s)://head:8265
    device: Device = Device.AUTO
    # the most actors the pool asks Ray for; "auto": as many as the cluster can offer (GPUs /
    # gpus_per_actor, counting the GPU nodes the autoscaler can start; else one per 2 CPUs)
    actors: int | str = "auto"
    gpus_per_actor: float = 1.0  # fractions share a GPU; ignored on CPU actors
    # seconds to wait for the first actor (GPU nodes may have to start) and for a replacement
    # when every actor is gone; then the run stops (exit 2 before any shard, else exit 4)
    startup_timeout_s: float = 600.0
    shard_size: int = 64  # images per shard (and per output file)
    max_retries: int = 3  # re-queues of a shard whose actor died
    max_failures: int = 0  # failed images tolerated before the exit code reports failure
    decode_threads: int = 4  # image-decoding threads per actor (Pillow releases the GIL)

    def __post_init__(self) -> None:
        remote = re.match(r"(ray|https?)://.", self.address)
        if self.address not in ("local", "auto") and not remote:
            fail("address", f"must be local, auto, ray://... or http(s)://...: {self.address!r}")
        object.__setattr__(self, "device", Device(self.device))
        if self.actors != "auto" and not (isinstance(self.actors, int) and self.actors >= 1):
            fail("actors", f"must be 'auto' or an integer >= 1, got {self.actors!r}")
        _positive("gpus_per_actor", self.gpus_per_actor)
        _positive("startup_timeout_s", self.startup_timeout_s)
        _positive("shard_size", self.shard_size)
        _positive("max_retries", self.max_retries, strict=False)
        _positive("max_failures", self.max_failures, strict=False)
        _positive("decode_threads", self.decode_threads)


@dataclass(frozen=True)
class AuditSettings:
    """Per-group decision rule (docs/design.md)."""

    threshold: float = 1.0  # flag a group whose fg/bg ratio CI lies below this
    min_images: int = 20  # fewer valid images: status too-few
    confidence: float = 0.95  # of the bootstrap interval
    boundary_px: int = 0  # mask edge band ignored, pixels of the resized image
    bootstrap: int = 2000  # bootstrap resamples
    seed: int = 0  # bootstrap seed
    max_error_share: float = 0.1  # more failed images than this share: verdict unreliable
    # flag where the Benjamini-Hochberg q-value is <= fdr; null: where the group's own interval
    # lies below the threshold (no control of false flags across many groups)
    fdr: float | None = 0.05

    def __post_init__(self) -> None:
        _positive("threshold", self.threshold)
        _positive("min_images", self.min_images)
        if not 0 < self.confidence < 1:
            fail("confidence", f"must be strictly between 0 and 1, got {self.confidence}")
        _positive("boundary_px", self.boundary_px, strict=False)
        _positive("bootstrap", self.bootstrap)
        if self.fdr is not None and not 0 < self.fdr < 1:
            fail("fdr", f"must lie strictly between 0 and 1 (or be null), got {self.fdr}")
        if not 0 <= self.max_error_share <= 1:
            fail("max_error_share", f"must lie in [0, 1], got {self.max_error_share}")


class Fill(_Option):
    MEAN = "mean"  # the mean colour of the image's background pixels
    BLUR = "blur"  # that colour blurred into the surrounding background


@dataclass(frozen=True)
class CounterfactualConfig:
    """Background swaps (Xiao et al. 2020) beside the occlusion maps, for images with a mask."""

    enabled: bool = True  # a few forward passes per image against hundreds for occlusion
    swaps: int = 4  # backgrounds of the same group (and as many of other groups) per image
    bank: int = 16  # images per group whose backgrounds are drawn from (chosen by seed)
    fill: Fill = Fill.MEAN  # how an image's own foreground is removed
    seed: int = 0  # with the image_id, picks each image's backgrounds

    def __post_init__(self) -> None:
        object.__setattr__(self, "fill", Fill(self.fill))
        _positive("swaps", self.swaps)
        _positive("bank", self.bank)
        if self.bank < 2:
            fail("bank", f"must be >= 2 (an image never gets its own background), got {self.bank}")


@dataclass(frozen=True)
class TrendConfig:
    """Runs of one audit over time (a nightly job): compare with the last, chart them all."""

    # folder holding this audit's run folders (one per night or model); after a run, the
    # newest earlier finished run there is compared with it and the history page is rebuilt,
    # both into output.report_dir (compare/, history/)
    runs_dir: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "runs_dir", _local(self.runs_dir))


@dataclass(frozen=True)
class NotifyConfig:
    """Who hears about a finished run."""

    webhook: str | None = None  # http(s) URL that receives the run's JSON summary by POST
    timeout_s: float = 10.0  # a webhook that does not answer in time is reported, not retried

    def __post_init__(self) -> None:
        if self.webhook is not None and not re.match(r"https?://.", self.webhook):
            fail("webhook", f"must be an http(s):// URL, got {self.webhook!r}")
        _positive("timeout_s", self.timeout_s)


@dataclass(frozen=True)
class OutputConfig:
    """Where results go; ``AuditConfig`` fills the defaults from the run name."""

    # run directory: a local folder, s3://bucket/prefix or gs://bucket/prefix; default
    # runs/<name> under the working directory
    dir: str | None = None
    report_dir: str | None = None  # shareable report, local or in a bucket; default reports/<name>
    # a bucket's run lock: a killed driver's lock is taken over this long after its last renewal
    lock_lease_s: float = 60.0

    def __post_init__(self) -> None:
        _positive("lock_lease_s", self.lock_lease_s)
        for key in ("dir", "report_dir"):
            value = getattr(self, key)
            try:
                if value is not None:
                    check_folder_uri(value)
            except ValueError as e:
                fail(key, str(e))
