"""The ``coco`` format: an instances JSON (``images``, ``annotations``, ``categories``).

``image_id`` is ``str(images[].id)``; the image file is ``file_name`` under ``dataset.root``.
The foreground is the union of the image's instance masks (polygons, uncompressed or compressed
RLE, decoded with pycocotools in the worker) or an instance's bbox when it has no segmentation.
``dataset.coco.categories`` keeps only the named categories as foreground. ``group_by`` may name
any field of the ``images[]`` entries, or ``category``/``supercategory`` of the image's largest
instance (by ``area``, else bbox area); ``label`` is that instance's category id.

The JSON is parsed once per process; rows follow ``images[]`` order.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.config.dataset import DatasetConfig
from pipeline.data.coco_schema import check_coco
from pipeline.data.records import CocoSegments, ImageRecord
from pipeline.data.source import ShardRef, Source, SourceError, light_schema
from pipeline.storage.read import read_bytes

__all__ = ["CocoSource", "looks_like_coco"]

_LARGEST = ("category", "supercategory")  # group keys taken from the largest instance


def looks_like_coco(data: Any) -> bool:
    return isinstance(data, dict) and "images" in data and "annotations" in data


@dataclass(frozen=True)
class _Parsed:
    images: list[dict[str, Any]]
    anns: dict[Any, list[dict[str, Any]]]  # image id -> its annotations, in file order
    cats: dict[Any, dict[str, Any]]  # category id -> category


@functools.lru_cache(maxsize=2)
def _parse(path: str) -> _Parsed:
    try:
        data = json.loads(read_bytes(path))
    except FileNotFoundError as e:
        raise SourceError(f"COCO file not found: {path} ({e})") from e
    except ValueError as e:
        raise SourceError(f"{path}: not valid JSON: {e}") from e
    except RecursionError:
        raise SourceError(f"{path}: not a COCO file: its JSON is nested too deeply") from None
    if not looks_like_coco(data):
        raise SourceError(f"{path}: a COCO file needs 'images' and 'annotations' lists")
    check_coco(data, path)  # below, every entry has the types the reader relies on
    anns: dict[Any, list[dict[str, Any]]] = {}
    for a in data["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    cats = {c["id"]: c for c in data.get("categories") or []}
    return _Parsed(list(data["images"]), anns, cats)


def _area(a: dict[str, Any]) -> float:
    """The instance's ``area`` (pixels), else its bbox's (checked finite by :func:`check_coco`)."""
    if a.get("area") is not None:
        return float(a["area"])
    bbox = a.get("bbox") or [0, 0, 0, 0]
    return float(bbox[2]) * float(bbox[3])


class CocoSource(Source):
    """Images and instance masks of a COCO instances JSON."""

    def __init__(self, cfg: DatasetConfig) -> None:
        super().__init__(cfg)
        self.coco = _parse(cfg.manifest)
        if not self.coco.images:
            raise SourceError(f"{cfg.manifest} has no images")
        wanted = cfg.coco.categories
        by_name = {c.get("name"): cid for cid, c in self.coco.cats.items()}
        if wanted is not None:
            unknown = [n for n in wanted if n not in by_name]
            if unknown:
                raise SourceError(
                    f"dataset.coco.categories names unknown categories {unknown}; "
                    f"{cfg.manifest} has {sorted(map(str, by_name))[:20]}"
                )
        self.keep = None if wanted is None else {by_name[n] for n in wanted}
        fields = set().union(*(im.keys() for im in self.coco.images[:1000]))
        bad = [g for g in cfg.group_by if g not in fields and g not in _LARGEST]
        if bad:
            raise SourceError(
                f"group_by {bad}: not a field of {cfg.manifest}'s images[] entries "
                f"({sorted(fields)}) nor category/supercategory"
            )
        n_anns = sum(len(v) for v in self.coco.anns.values())
        self.found = (
            f"COCO instances, {len(self.coco.images)} images, {n_anns} annotations, "
            f"{len(self.coco.cats)} categories"
        )

    @property
    def num_rows(self) -> int:
        return len(self.coco.images)

    def _instances(self, im: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
        """The image's foreground annotations and, when one is bad, the error."""
        out = []
        for a in self.coco.anns.get(im.get("id"), []):
            cid = a.get("category_id")
            if cid not in self.coco.cats:
                return [], (
                    f"image {str(im.get('id'))!r}: annotation {a.get('id')} has unknown "
                    f"category_id {cid!r}"
                )
            if self.keep is None or cid in self.keep:
                out.append(a)
        return out, None

    def _row(self, im: dict[str, Any]) -> tuple[ImageRecord, bool]:
        image_id = str(im.get("id"))
        anns, error = self._instances(im)
        largest = max(anns, key=_area) if anns else None
        cat = self.coco.cats.get(largest.get("category_id")) if largest else None
        groups: dict[str, str | None] = {}
        for g in self.cfg.group_by:
            if g in _LARGEST:
                groups[g] = None if cat is None else _str(cat.get("name" if g == "category" else g))
            else:
                groups[g] = _str(im.get(g))
        fg = None
        if anns:
            fg = CocoSegments(
                segments=tuple(a.get("segmentation") or None for a in anns),
                bboxes=tuple(
                    tuple(float(v) for v in (a.get("bbox") or (0, 0, 0, 0))) for a in anns
                ),
                height=int(im.get("height") or 0),  # whole pixels (check_coco)
                width=int(im.get("width") or 0),
                name=f"coco:{image_id}",
            )
        rec = ImageRecord(
            image_id=image_id,
            path=str(im.get("file_name") or ""),
            groups=groups,
            label=None if largest is None else str(largest.get("category_id")),
            fg=fg,
            error=error
            if error
            else (None if im.get("file_name") else f"image {image_id!r}: no file_name"),
        )
        return rec, bool(anns)

    def light(self, rows: int = 65536) -> Iterator[pa.Table]:
        for start in range(0, self.num_rows, rows):
            recs = [self._row(im) for im in self.coco.images[start : start + rows]]
            yield pa.table(
                {
                    "image_id": pa.array([r.image_id for r, _ in recs], pa.string()),
                    **{
                        f"group:{g}": pa.array([r.groups[g] for r, _ in recs], pa.string())
                        for g in self.cfg.group_by
                    },
                    "label": pa.array([r.label for r, _ in recs], pa.string()),
                    "has_fg": pa.array([h for _, h in recs], pa.bool_()),
                    "what": pa.array(
                        [f"{r.path}|{r.mask}|{r.error}" for r, _ in recs], pa.string()
                    ),
                },
                schema=light_schema(self.cfg.group_by),
            )

    def read(self, ref: ShardRef) -> list[ImageRecord]:
        return [self._row(im)[0] for im in self.coco.images[ref.start : ref.stop]]

    def take(self, rows: Sequence[int]) -> list[ImageRecord]:
        return [self._row(self.coco.images[r])[0] for r in rows]

    def fetch(self, image_id: str, locator: str, mask: str | None) -> ImageRecord:
        for im in self.coco.images:
            if str(im.get("id")) == image_id:
                return self._row(im)[0]
        raise SourceError(f"image {image_id!r} is not in {self.cfg.manifest}")

    def fingerprint(self) -> str:
        return f"coco images={self.num_rows} categories={sorted(map(str, self.coco.cats))}"

    def class_names(self) -> dict[str, str]:
        # the stored label is the largest instance's category id as text
        return {str(cid): str(c["name"]) for cid, c in self.coco.cats.items() if c.get("name")}


def _str(value: Any) -> str | None:
    return None if value is None else str(value)
