"""The ``dataset:`` section: where the images are, in which format, and where the foreground is.

Formats and foreground sources are described in docs/design.md ("Sources of data"). A source is
opened, and an ``auto`` format detected, only when a run or ``inspect`` starts
(:func:`pipeline.data.source.open_source`): loading a config reads no data.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from pipeline.config.typed import fail
from pipeline.schema import LABEL_GROUP, maps_schema
from pipeline.storage.paths import parent, resolve_local

__all__ = ["CocoConfig", "ColumnsConfig", "DataFormat", "DatasetConfig", "NormalizeConfig"]


def _local(path: str | None) -> str | None:
    return None if path is None else resolve_local(path, None)


def _positive(key: str, value: float, *, strict: bool = True) -> None:
    # NaN compares false with everything, so it is refused by name, like infinity
    if not math.isfinite(value) or value < 0 or (strict and value == 0):
        fail(key, f"must be a finite number {'> 0' if strict else '>= 0'}, got {value!r}")


class DataFormat(str, enum.Enum):
    """How ``dataset.manifest`` is laid out."""

    AUTO = "auto"  # detect from the file or folder, and say what was found
    TABLE = "table"  # Parquet/CSV manifest: one row per image, paths to image files
    HUGGINGFACE = "huggingface"  # Parquet written by `datasets`, images as Image features
    COCO = "coco"  # an instances JSON (images, annotations, categories)
    WEBDATASET = "webdataset"  # tar shards, brace patterns allowed
    IMAGEFOLDER = "imagefolder"  # <class>/<image>

    def __str__(self) -> str:
        return str(self.value)


@dataclass(frozen=True)
class ColumnsConfig:
    """Column (or member) names of the source."""

    id: str = "image_id"  # unique image key; huggingface without it: the row index as text
    path: str = "path"  # table: image path, relative to dataset.root
    label: str = "label"  # optional; a missing column means no labels
    mask: str = "mask_path"  # optional mask: a path column, an Image column or a tar member
    box: tuple[str, str, str, str] | None = None  # optional x0,y0,x1,y1 columns, original pixels
    boxes: str | None = None  # optional list column of [x0, y0, x1, y1] boxes, original pixels
    image: str | None = None  # huggingface: Image column (None: the first); webdataset: member

    def __post_init__(self) -> None:
        if self.id == self.path:
            fail("path", f"must differ from columns.id, both are {self.id!r}")
        if self.box is not None and self.boxes is not None:
            fail("boxes", "give either box (four columns) or boxes (one list column)")


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


@dataclass(frozen=True)
class CocoConfig:
    """COCO specifics."""

    categories: tuple[str, ...] | None = None  # category names that are foreground; None: all


@dataclass(frozen=True, kw_only=True)
class DatasetConfig:
    """The source of images and foregrounds, and how images become model inputs."""

    # Parquet/CSV manifest, huggingface Parquet file or folder, COCO JSON, tar shard pattern
    # or image folder: a local path, s3://, gs:// or hf://datasets/...
    manifest: str
    format: DataFormat = DataFormat.AUTO
    root: str | None = None  # image/mask paths resolve against it; default: the manifest's folder
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    group_by: tuple[str, ...] = ()  # columns to aggregate by; () = one group
    image_size: tuple[int, int] = (224, 224)  # (H, W) pixels after resize
    normalize: NormalizeConfig | None = None  # None: the model takes [0, 1] RGB as is
    # Class-id or palette masks: these values are foreground, ignore_value is neither
    # foreground nor background (VOC's 255 border); None: any non-zero value is foreground.
    foreground_values: tuple[int, ...] | None = None
    ignore_value: int | None = None
    static_mask: str | None = None  # one mask image for every image (a fixed camera)
    static_region: tuple[float, float, float, float] | None = None  # x0,y0,x1,y1, fractions
    masks_dir: str | None = None  # imagefolder: masks in a parallel <class>/<image> tree
    boxes: str | None = None  # imagefolder: CSV/Parquet of boxes (columns.id + x0,y0,x1,y1)
    coco: CocoConfig = field(default_factory=CocoConfig)
    # Hostile-input bounds, checked before decoding: a worker holds at most
    # cluster.decode_threads images of max_pixels each while decoding (docs/design.md, "Data").
    max_file_bytes: int = 64 << 20  # bytes read per image or mask file
    max_pixels: int = 25_000_000  # pixels per image or mask (6000x4000 is 24 MP)

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", DataFormat(self.format))
        object.__setattr__(self, "manifest", resolve_local(self.manifest, None))
        # an image folder's paths are relative to its parent too, so that a parallel masks
        # folder beside it lies under the same root
        root = parent(self.manifest.rstrip("/")) if self.root is None else self.root
        object.__setattr__(self, "root", resolve_local(root, None))
        for key in ("static_mask", "masks_dir", "boxes"):
            object.__setattr__(self, key, _local(getattr(self, key)))
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
        _positive("max_file_bytes", self.max_file_bytes)
        _positive("max_pixels", self.max_pixels)
        if min(self.image_size) < 1:
            fail("image_size", f"must be positive [H, W], got {list(self.image_size)!r}")
        self._check_foreground()

    def _check_foreground(self) -> None:
        if self.foreground_values is not None and not self.foreground_values:
            fail("foreground_values", "must list at least one value, or be left out")
        values = self.foreground_values or ()
        if self.ignore_value is not None and self.ignore_value in values:
            fail("ignore_value", f"{self.ignore_value} is also in foreground_values")
        if self.static_mask is not None and self.static_region is not None:
            fail("static_region", "give either static_mask or static_region")
        if self.static_region is not None:
            x0, y0, x1, y1 = self.static_region
            ok = all(math.isfinite(v) and 0 <= v <= 1 for v in self.static_region)
            if not ok or x1 <= x0 or y1 <= y0:
                fail(
                    "static_region",
                    f"must be fractions 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1 of the image's "
                    f"width and height, got {list(self.static_region)!r}",
                )

    @property
    def static(self) -> bool:
        """Whether one foreground serves every image."""
        return self.static_mask is not None or self.static_region is not None
