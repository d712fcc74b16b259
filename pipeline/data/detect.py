"""Which format a dataset is in, and opening it.

``auto`` looks at ``dataset.manifest`` and says what it found:

- a ``.json`` file with ``images`` and ``annotations``: ``coco``;
- ``.tar`` shards or a brace pattern: ``webdataset``;
- Parquet whose schema metadata marks ``datasets`` Image features: ``huggingface``;
- a folder of class folders of images: ``imagefolder``;
- anything else: ``table``.
"""

from __future__ import annotations

import os
from dataclasses import replace

from pipeline.config.dataset import DataFormat, DatasetConfig
from pipeline.data.source import Source, SourceError

__all__ = ["detect_format", "open_source", "resolve_format"]


def _ext(path: str) -> str:
    return os.path.splitext(path.rstrip("/").split("?")[0])[1].lower()


def detect_format(cfg: DatasetConfig) -> tuple[DataFormat, str]:
    """``(format, reason)`` for ``cfg.manifest``; ``cfg.format`` when it is not ``auto``."""
    if cfg.format is not DataFormat.AUTO:
        return cfg.format, f"dataset.format is {cfg.format}"
    path = cfg.manifest
    if ".tar" in path and ("{" in path or _ext(path) == ".tar" or "::" in path):
        return DataFormat.WEBDATASET, "tar shards"
    if _ext(path) == ".json":
        from pipeline.data.coco import _parse

        _parse(path)  # raises SourceError naming what is wrong; cached for the source
        return DataFormat.COCO, "a JSON file with images and annotations"
    from pipeline.storage.files import is_folder

    try:
        folder = is_folder(path)
    except (OSError, ValueError):
        folder = False
    if _ext(path) in (".parquet", ".pq") or folder:
        from pipeline.data.huggingface import hf_features, parquet_files
        from pipeline.data.rows import ParquetRows

        try:
            files = parquet_files(path)
            feats = hf_features(ParquetRows(files[:1]).schema)
        except SourceError:
            files, feats = [], {}
        images = [k for k, v in feats.items() if isinstance(v, dict) and v.get("_type") == "Image"]
        if images:
            return DataFormat.HUGGINGFACE, f"Parquet with `datasets` Image feature(s) {images}"
        if folder and not files:
            from pipeline.data.imagefolder import looks_like_imagefolder

            if looks_like_imagefolder(path):
                return DataFormat.IMAGEFOLDER, "a folder of class folders of images"
            raise SourceError(
                f"{path}: a folder, but neither Parquet files nor class folders of images"
            )
    return DataFormat.TABLE, "a manifest table (Parquet or CSV)"


def resolve_format(cfg: DatasetConfig) -> tuple[DatasetConfig, str]:
    """``cfg`` with its format detected, plus the reason. For an image folder ``group_by``
    defaults to the class folder. The driver
    resolves once, so that every worker opens the same format."""
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
    if cfg.format is DataFormat.HUGGINGFACE:
        from pipeline.data.huggingface import HuggingFaceSource as cls
    elif cfg.format is DataFormat.COCO:
        from pipeline.data.coco import CocoSource as cls
    elif cfg.format is DataFormat.WEBDATASET:
        from pipeline.data.webdataset import WebDatasetSource as cls
    elif cfg.format is DataFormat.IMAGEFOLDER:
        from pipeline.data.imagefolder import ImageFolderSource as cls
    else:
        from pipeline.data.table import TableSource as cls
    source = cls(cfg)
    source.detected = why
    return source
