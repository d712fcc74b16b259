"""The ``imagefolder`` format: ``<class>/<image>`` under ``dataset.manifest``.

The group column ``class`` is the class folder and ``label`` the class index in sorted order
(as torchvision's ``ImageFolder`` numbers them). ``image_id`` is the relative path without its
extension (``dog/12``). Masks come from ``dataset.masks_dir``, a parallel tree matched by that
id; boxes from ``dataset.boxes``, a CSV or Parquet file with one row per box (``columns.id`` and
``x0, y0, x1, y1``, or the columns named by ``columns.box``). The listing is made once per
process, sorted, so the driver and every worker see the same rows.
"""

from __future__ import annotations

import posixpath
from dataclasses import replace

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config.dataset import ColumnsConfig, DatasetConfig
from pipeline.data.manifest import IMAGE_EXTENSIONS
from pipeline.data.rows import MemoryRows
from pipeline.data.source import SourceError
from pipeline.data.table import TableSource, table_rows
from pipeline.storage.files import list_files

__all__ = ["CLASS_COLUMN", "ImageFolderSource", "looks_like_imagefolder"]

CLASS_COLUMN = "class"
_BOX = ("x0", "y0", "x1", "y1")


def _images(folder: str, skip: str | None) -> dict[str, str]:
    """Image files under ``folder`` by id (relative path without extension)."""
    out: dict[str, str] = {}
    for f in list_files(folder):
        if skip is not None and (f + "/").startswith(skip.rstrip("/") + "/"):
            continue
        rel = f[len(folder.rstrip("/")) + 1 :]
        stem, ext = posixpath.splitext(rel)
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        if stem in out:
            raise SourceError(f"{out[stem]} and {f} would share the image id {stem!r}")
        out[stem] = rel
    return out


def looks_like_imagefolder(folder: str) -> bool:
    """A folder whose images lie in class folders, one level down or deeper."""
    try:
        found = _images(folder, None)
    except (OSError, SourceError):
        return False
    return bool(found) and all("/" in k for k in found)


def _boxes(cfg: DatasetConfig, ids: list[str]) -> pa.Array:
    """One list of boxes per id (null where the file has none)."""
    rows = table_rows(replace(cfg, manifest=str(cfg.boxes)))
    cols = cfg.columns.box or _BOX
    table = rows.read(0, rows.num_rows, [cfg.columns.id, *cols])
    keys = pc.cast(table.column(cfg.columns.id), pa.string()).to_pylist()
    coords = [pc.cast(table.column(c), pa.float64()).to_pylist() for c in cols]
    by_id: dict[str, list[list[float]]] = {}
    for k, *box in zip(keys, *coords, strict=True):
        by_id.setdefault(k, []).append(box)
    return pa.array([by_id.get(i) for i in ids], pa.list_(pa.list_(pa.float64())))


class ImageFolderSource(TableSource):
    """Class folders of images, read as a table ``image_id, path, class, label[, mask, boxes]``."""

    def __init__(self, cfg: DatasetConfig) -> None:
        folder = cfg.manifest.rstrip("/")
        try:
            images = _images(folder, cfg.masks_dir)
        except FileNotFoundError as e:
            raise SourceError(f"image folder not found: {folder} ({e})") from e
        loose = [k for k in images if "/" not in k]
        if not images or loose:
            raise SourceError(
                f"{folder}: an image folder holds <class>/<image> files"
                + (f"; {loose[:3]} lie outside any class folder" if loose else ", found none")
            )
        ids = sorted(images)
        classes = [k.split("/", 1)[0] for k in ids]
        index = {c: i for i, c in enumerate(sorted(set(classes)))}
        base = _under(folder, cfg.root)
        data = {
            "image_id": pa.array(ids, pa.string()),
            "path": pa.array([base + images[k] for k in ids], pa.string()),
            CLASS_COLUMN: pa.array(classes, pa.string()),
            "label": pa.array([str(index[c]) for c in classes], pa.string()),
        }
        columns = ColumnsConfig(id="image_id", path="path", label="label", mask="mask_path")
        if cfg.masks_dir is not None:
            masks = _images(cfg.masks_dir, None)
            prefix = _under(cfg.masks_dir, cfg.root)
            data["mask_path"] = pa.array(
                [prefix + masks[k] if k in masks else None for k in ids], pa.string()
            )
        if cfg.boxes is not None:
            data["boxes"] = _boxes(cfg, ids)
            columns = replace(columns, boxes="boxes")
        super().__init__(
            cfg,
            MemoryRows(pa.table(data)),
            found=f"image folder, {len(ids)} images in {len(index)} class folders",
            table_cfg=replace(cfg, columns=columns),
        )
        self._names = {str(i): c for c, i in index.items()}

    def class_names(self) -> dict[str, str]:
        # the stored label is the class folder's index in sorted order, as text
        return dict(self._names)


def _under(folder: str, root: str | None) -> str:
    """The prefix that makes a path under ``folder`` relative to ``root`` (``""`` or ``a/b/``)."""
    folder, root = folder.rstrip("/"), (root or "").rstrip("/")
    if folder == root:
        return ""
    if root and folder.startswith(root + "/"):
        return folder[len(root) + 1 :] + "/"
    raise SourceError(
        f"{folder} is not under dataset.root {root!r}; set dataset.root to a folder holding it"
    )
