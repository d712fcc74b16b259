"""The formats of data, in one registry: each format's source class and its detector.

A format's name is its :class:`~pipeline.config.dataset.DataFormat` value; :data:`FORMATS` maps
it to the class that reads it and to the test that recognises it, the way ``datasets`` maps its
packaged modules to their builders. ``auto`` asks the detectors in the registry's order and says
what it found:

- ``webdataset``: ``.tar`` shards or a brace pattern;
- ``coco``: a ``.json`` file with ``images`` and ``annotations``;
- ``huggingface``: Parquet whose schema metadata marks ``datasets`` Image features;
- ``imagefolder``: a folder of class folders of images;
- ``table``: anything else (a Parquet or CSV manifest).

Source classes are imported only when their format is opened.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

from pipeline.config.dataset import DataFormat, DatasetConfig
from pipeline.data.source import Source, SourceError

__all__ = ["FORMATS", "Format", "detect_format", "open_source", "resolve_format"]


@dataclass(frozen=True)
class _Probe:
    """What the detectors look at, each fact worked out once."""

    path: str

    @functools.cached_property
    def ext(self) -> str:
        return os.path.splitext(self.path.rstrip("/").split("?")[0])[1].lower()

    @functools.cached_property
    def folder(self) -> bool:
        from pipeline.storage.files import is_folder

        try:
            return is_folder(self.path)
        except (OSError, ValueError):
            return False

    @functools.cached_property
    def parquet(self) -> tuple[list[str], list[str]]:
        """The Parquet files at the path, and the `datasets` Image features of the first."""
        if self.ext not in (".parquet", ".pq") and not self.folder:
            return [], []
        from pipeline.data.huggingface import hf_features, parquet_files
        from pipeline.data.rows import ParquetRows

        try:
            files = parquet_files(self.path)
            feats = hf_features(ParquetRows(files[:1]).schema)
        except SourceError:
            return [], []
        images = [k for k, v in feats.items() if isinstance(v, dict) and v.get("_type") == "Image"]
        return files, images


def _tars(p: _Probe) -> str | None:
    tar = ".tar" in p.path and ("{" in p.path or p.ext == ".tar" or "::" in p.path)
    return "tar shards" if tar else None


def _coco(p: _Probe) -> str | None:
    if p.ext != ".json":
        return None
    from pipeline.data.coco import _parse

    _parse(p.path)  # raises SourceError naming what is wrong; cached for the source
    return "a JSON file with images and annotations"


def _hf_parquet(p: _Probe) -> str | None:
    images = p.parquet[1]
    return f"Parquet with `datasets` Image feature(s) {images}" if images else None


def _image_folder(p: _Probe) -> str | None:
    if not p.folder or p.parquet[0]:
        return None
    from pipeline.data.imagefolder import looks_like_imagefolder

    if looks_like_imagefolder(p.path):
        return "a folder of class folders of images"
    raise SourceError(f"{p.path}: a folder, but neither Parquet files nor class folders of images")


@dataclass(frozen=True)
class Format:
    """One format: ``"module:Class"`` of its :class:`Source`, and its detector (``probe ->
    reason`` when the manifest is in this format, else None; None for the fallback)."""

    source: str
    detect: Callable[[_Probe], str | None] | None

    def source_class(self) -> type[Source]:
        module, _, name = self.source.partition(":")
        return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


# The registry, in the order ``auto`` asks the detectors; ``table`` is what nothing else is.
FORMATS: dict[DataFormat, Format] = {
    DataFormat.WEBDATASET: Format("pipeline.data.webdataset:WebDatasetSource", _tars),
    DataFormat.COCO: Format("pipeline.data.coco:CocoSource", _coco),
    DataFormat.HUGGINGFACE: Format("pipeline.data.huggingface:HuggingFaceSource", _hf_parquet),
    DataFormat.IMAGEFOLDER: Format("pipeline.data.imagefolder:ImageFolderSource", _image_folder),
    DataFormat.TABLE: Format("pipeline.data.table:TableSource", None),
}


def detect_format(cfg: DatasetConfig) -> tuple[DataFormat, str]:
    """``(format, reason)`` for ``cfg.manifest``; ``cfg.format`` when it is not ``auto``.

    Raises:
        SourceError: the manifest looks like a format but breaks it (a COCO JSON without
            images, a folder with neither Parquet files nor class folders).
    """
    if cfg.format is not DataFormat.AUTO:
        return cfg.format, f"dataset.format is {cfg.format}"
    probe = _Probe(cfg.manifest)
    for fmt, entry in FORMATS.items():
        why = entry.detect(probe) if entry.detect is not None else None
        if why is not None:
            return fmt, why
    return DataFormat.TABLE, "a manifest table (Parquet or CSV)"


def resolve_format(cfg: DatasetConfig) -> tuple[DatasetConfig, str]:
    """``cfg`` with its format detected, plus the reason. For an image folder ``group_by``
    defaults to the class folder. The driver resolves once, so that every worker opens the
    same format."""
    fmt, why = detect_format(cfg)
    changes: dict = {}
    if fmt is not cfg.format:
        changes["format"] = fmt
        why = f"{why} (dataset.format: auto)"
    if fmt is DataFormat.IMAGEFOLDER and not cfg.group_by:
        from pipeline.data.imagefolder import CLASS_COLUMN

        changes["group_by"] = (CLASS_COLUMN,)
    return (replace(cfg, **changes) if changes else cfg), why


def open_source(cfg: DatasetConfig) -> Source:
    """The source of ``cfg`` (its format detected when ``auto``).

    Raises:
        SourceError: the data cannot be opened or breaks its format's contract.
    """
    cfg, why = resolve_format(cfg)
    source = FORMATS[cfg.format].source_class()(cfg)
    source.format = cfg.format.value
    source.detected = why
    return source
