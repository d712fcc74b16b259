"""The sections of the audit configuration (DESIGN section 3), one frozen dataclass each.

Each ``__post_init__`` checks its own values and raises ``ConfigError`` with the key relative to
the section; ``pipeline.config.load_config`` adds the section's dotted prefix. Local paths are
made absolute here so that a config built in code behaves like one loaded from YAML.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline._typed_config import fail
from pipeline.baselines import Baseline
from pipeline.schema import LABEL_GROUP, maps_schema
from pipeline.targets import Score, Task
from pipeline.uri import parent, resolve_local

__all__ = [
    "AuditSettings",
    "ClusterConfig",
    "ColumnsConfig",
    "DatasetConfig",
    "HubConfig",
    "ModelConfig",
    "NormalizeConfig",
    "OcclusionConfig",
    "OutputConfig",
    "Precision",
    "RepoType",
    "Target",
]


class _Option(str, enum.Enum):
    def __str__(self) -> str:  # messages and f-strings show the YAML spelling
        return str(self.value)


class Target(_Option):
    PREDICTED = "predicted"  # the unoccluded argmax
    LABEL = "label"  # the manifest label, as a class index


class Precision(_Option):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class Engine(_Option):
    AUTO = "auto"  # incremental where the model allows it, else generic
    GENERIC = "generic"  # a full forward pass per occluded copy
    INCREMENTAL = "incremental"  # recompute only what a window changes; error if unsupported


class RepoType(_Option):
    MODEL = "model"
    DATASET = "dataset"
    SPACE = "space"


def _local(path: str | None) -> str | None:
    return None if path is None else resolve_local(path, None)


def _positive(key: str, value: float, *, strict: bool = True) -> None:
    if value < 0 or (strict and value == 0):
        fail(key, f"must be {'> 0' if strict else '>= 0'}, got {value!r}")


@dataclass(frozen=True)
class ColumnsConfig:
    """Manifest column names."""

    id: str = "image_id"  # unique image key, stored with every result row
    path: str = "path"  # image path, relative to dataset.root
    label: str = "label"  # optional; a missing column means no labels
    mask: str = "mask_path"  # optional foreground-mask image path (non-zero = foreground)
    box: tuple[str, str, str, str] | None = None  # optional x0,y0,x1,y1 columns, original pixels

    def __post_init__(self) -> None:
        if self.id == self.path:
            fail("path", f"must differ from columns.id, both are {self.id!r}")


@dataclass(frozen=True)
class NormalizeConfig:
    """Per-channel ``(x - mean) / std`` applied inside the model wrapper, after occlusion."""

    mean: tuple[float, ...]  # 1 or 3 values, in [0, 1] pixel units
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        for key in ("mean", "std"):
            if len(getattr(self, key)) not in (1, 3):
                fail(key, f"must have 1 or 3 values, got {list(getattr(self, key))!r}")
        if len(self.std) != len(self.mean):
            fail("std", f"must have as many values as mean ({len(self.mean)})")
        if any(s <= 0 for s in self.std):
            fail("std", f"must be > 0, got {list(self.std)!r}")


@dataclass(frozen=True, kw_only=True)
class DatasetConfig:
    """The manifest and how its images become model inputs."""

    manifest: str  # Parquet/CSV: local path, s3://, gs://, hf://datasets/...
    root: str | None = None  # image/mask paths resolve against it; default: the manifest's folder
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    group_by: tuple[str, ...] = ()  # manifest columns to aggregate by; () = one group
    image_size: tuple[int, int] = (224, 224)  # (H, W) pixels after resize
    normalize: NormalizeConfig | None = None  # None: the model takes [0, 1] RGB as is

    def __post_init__(self) -> None:
        object.__setattr__(self, "manifest", resolve_local(self.manifest, None))
        root = parent(self.manifest) if self.root is None else self.root
        object.__setattr__(self, "root", resolve_local(root, None))
        if len(set(self.group_by)) != len(self.group_by):
            fail("group_by", f"has duplicates: {list(self.group_by)!r}")
        try:
            maps_schema(self.group_by)  # group columns are stored beside the result columns
        except ValueError as e:
            fail("group_by", f"{e}; rename the manifest column")
        if LABEL_GROUP in self.group_by and self.columns.label != LABEL_GROUP:
            fail(
                "group_by",
                f"'{LABEL_GROUP}' is stored as the manifest label, which is column "
                f"{self.columns.label!r} (columns.label); group by {self.columns.label!r}",
            )
        if min(self.image_size) < 1:
            fail("image_size", f"must be positive [H, W], got {list(self.image_size)!r}")


@dataclass(frozen=True)
class HubConfig:
    """A file on the Hugging Face Hub (downloaded into the hub cache; works offline once there)."""

    repo_id: str  # owner/name
    filename: str  # path inside the repository
    revision: str | None = None  # pin a commit for reproducible audits; None = default branch
    repo_type: RepoType = RepoType.MODEL

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", self.repo_id):
            fail("repo_id", f"must be 'owner/name', got {self.repo_id!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Where the model comes from and what score of it is explained."""

    torchscript: str | None = None  # torch.jit.save archive: local path or URI
    export: str | None = None  # torch.export program (.pt2): local path or URI
    factory: str | None = None  # "module:callable" returning an nn.Module
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False)  # for factory
    weights: str | None = None  # factory's state_dict (local/URI), loaded with weights_only=True
    hub: HubConfig | None = None  # a model file on the Hub; with factory: its state_dict
    task: Task = Task.CLASSIFICATION
    score: Score = Score.LOGIT  # classification only
    target: int | Target = Target.PREDICTED  # output explained: predicted, label or an index

    def __post_init__(self) -> None:
        for key in ("torchscript", "export", "weights"):
            object.__setattr__(self, key, _local(getattr(self, key)))
        sources = [k for k in ("torchscript", "export", "factory", "hub") if getattr(self, k)]
        if sources == ["factory", "hub"]:
            if self.weights is not None:
                fail("weights", "give either weights or hub as the factory's state_dict")
        elif len(sources) != 1:
            found = ", ".join(sources) or "none"
            fail("", f"needs exactly one of torchscript, export, factory, hub; got {found}")
        if self.factory is not None and not re.fullmatch(r"[\w.]+:[\w.]+", self.factory):
            fail("factory", f"must be 'module:callable', got {self.factory!r}")
        if (self.kwargs or self.weights) and self.factory is None:
            fail("kwargs" if self.kwargs else "weights", "applies only with factory")
        if isinstance(self.target, int) and self.target < 0:
            fail("target", f"must be >= 0, got {self.target}")
        if self.task is Task.REGRESSION:
            if self.score is Score.PROBABILITY:
                fail("score", "'probability' applies only to task: classification")
            if self.target is Target.LABEL:
                fail("target", "'label' is a class index; use predicted or an output index")


@dataclass(frozen=True)
class OcclusionConfig:
    """The occlusion sweep (DESIGN section 4); pixels are those of the resized image."""

    window: tuple[int, ...] = (32, 32)  # [h, w] across all channels, or [c, h, w]
    stride: tuple[int, ...] = (16, 16)  # same length as window
    baseline: Baseline = Baseline.RANDOM_PIXEL
    value: float | tuple[float, ...] = 0.0  # constant baseline: one value or one per channel
    blur_sigma: float = 5.0  # blur baseline: Gaussian sigma in pixels
    n_baselines: int | None = None  # K draws averaged; None: 3 for random baselines, else 1
    seed: int = 0  # with the image_id, seeds each image's draws
    precision: Precision = Precision.FP32  # bf16/fp16 on GPU only
    max_batch: int | None = None  # occluded copies per pass; None: 32 for CPU full passes, else 256
    engine: Engine = Engine.AUTO  # how occluded scores are computed (maps agree to ~1e-6)

    def __post_init__(self) -> None:
        if len(self.window) not in (2, 3):
            fail("window", f"must be [h, w] or [c, h, w], got {list(self.window)!r}")
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
        _positive("blur_sigma", self.blur_sigma)
        k = self.n_baselines
        if k is None:
            object.__setattr__(self, "n_baselines", 3 if self.baseline.is_random else 1)
        elif k < 1:
            fail("n_baselines", f"must be >= 1, got {k}")
        elif k != 1 and not self.baseline.is_random:
            fail("n_baselines", f"must be 1 for the fixed baseline {self.baseline.value}, got {k}")
        if self.max_batch is not None:
            _positive("max_batch", self.max_batch)


@dataclass(frozen=True)
class ClusterConfig:
    """Where and how wide the run goes (DESIGN section 8)."""

    address: str = "local"  # local (embedded Ray) | auto | ray://host:10001 | http(s)://head:8265
    actors: int | str = "auto"  # "auto": one per GPU, else one per 2 CPUs
    gpus_per_actor: float = 1.0  # fractions share a GPU; ignored without GPUs
    shard_size: int = 64  # images per shard (and per output file)
    max_retries: int = 3  # re-queues of a shard whose actor died
    max_failures: int = 0  # failed images tolerated before the exit code reports failure

    def __post_init__(self) -> None:
        remote = re.match(r"(ray|https?)://.", self.address)
        if self.address not in ("local", "auto") and not remote:
            fail("address", f"must be local, auto, ray://... or http(s)://...: {self.address!r}")
        if self.actors != "auto" and not (isinstance(self.actors, int) and self.actors >= 1):
            fail("actors", f"must be 'auto' or an integer >= 1, got {self.actors!r}")
        _positive("gpus_per_actor", self.gpus_per_actor)
        _positive("shard_size", self.shard_size)
        _positive("max_retries", self.max_retries, strict=False)
        _positive("max_failures", self.max_failures, strict=False)


@dataclass(frozen=True)
class AuditSettings:
    """Per-group decision rule (DESIGN section 6)."""

    threshold: float = 1.0  # flag a group whose fg/bg ratio CI lies below this
    min_images: int = 20  # fewer valid images: status too-few
    confidence: float = 0.95  # of the bootstrap interval
    boundary_px: int = 0  # mask edge band ignored, pixels of the resized image
    bootstrap: int = 2000  # bootstrap resamples
    seed: int = 0  # bootstrap seed

    def __post_init__(self) -> None:
        _positive("threshold", self.threshold)
        _positive("min_images", self.min_images)
        if not 0 < self.confidence < 1:
            fail("confidence", f"must be strictly between 0 and 1, got {self.confidence}")
        _positive("boundary_px", self.boundary_px, strict=False)
        _positive("bootstrap", self.bootstrap)


@dataclass(frozen=True)
class OutputConfig:
    """Where results go; ``AuditConfig`` fills the defaults from the run name."""

    dir: str | None = None  # run directory; default runs/<name> under the working directory
    report_dir: str | None = None  # shareable report; default reports/<name>
