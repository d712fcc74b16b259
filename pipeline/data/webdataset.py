"""The ``webdataset`` format: tar shards, named by a brace pattern (``val-{000..099}.tar``).

A sample is the tar members sharing a key: the member's path up to the first dot of its file
name (``a/x1.mask.png`` has key ``a/x1`` and extension ``mask.png``). ``image_id`` is the key;
the image is the first member with an image extension (``columns.image`` names another), the
mask the member ``columns.mask`` (``mask.png``), and group columns and the label come from the
``json`` member. Tars are read in place, never unpacked to disk: the driver reads the headers
and the ``json`` members (seeking over the rest); a run shard is a range of one tar's samples,
and its worker reads just those members. A tar that stops before its end-of-archive blocks (cut
at a member boundary or inside a header) or inside a member's data is a :class:`SourceError`
naming it, never a tar with fewer samples.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa

from pipeline.config.dataset import DatasetConfig
from pipeline.data.records import ImageRecord, MaskBytes
from pipeline.data.source import ShardRef, Source, SourceError, light_schema
from pipeline.storage.files import open_file

__all__ = ["WebDatasetSource", "expand_urls", "split_key"]

_IMAGE_EXTS = {"png", "jpg", "jpeg", "bmp", "gif", "tif", "tiff", "webp", "ppm", "pgm", "pbm"}


def expand_urls(pattern: str) -> list[str]:
    """Shard URLs of a brace pattern; several patterns may be joined with ``::``."""
    from braceexpand import braceexpand

    return [u for part in pattern.split("::") for u in braceexpand(part)]


def split_key(name: str) -> tuple[str, str]:
    """``(key, extension)`` of a member name: ``a/x1.mask.png`` -> ``("a/x1", "mask.png")``."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext.lower()


def _samples(url: str, want: Any) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """``(key, {extension: data})`` per sample of one tar, in order. ``want(ext, position)``
    says whether a member's bytes are read (False: only its presence is noted, its bytes are
    skipped over).

    Raises:
        SourceError: the tar is missing, is no tar, or was cut short (:func:`_check_end`): a
            reader that reaches the end has seen every sample or says why not.
    """
    try:
        fh = open_file(url)
    except FileNotFoundError as e:
        raise SourceError(f"tar shard not found: {url}") from e
    key: str | None = None
    members: dict[str, bytes | None] = {}
    pos, name = -1, None  # the sample's position in the tar, the last member's name
    with fh:
        try:
            with tarfile.open(fileobj=fh, mode="r:") as tar:
                for info in tar:
                    name = info.name
                    if not info.isfile() or posixpath.basename(info.name).startswith("."):
                        continue
                    k, ext = split_key(info.name)
                    if k != key:
                        if key is not None:
                            yield key, members
                        key, members, pos = k, {}, pos + 1
                    reader = tar.extractfile(info) if want(ext, pos) else None
                    members[ext] = reader.read() if reader is not None else None
                # tarfile ends its iteration silently at a missing or unreadable header, so
                # a tar cut at a member boundary or inside a header would lose samples unseen
                _check_end(url, fh, tar.offset, name)
        except tarfile.TarError as e:  # a member's data runs past the end, or no tar at all
            where = f"in member {name!r}" if name else "at its start"
            raise SourceError(
                f"{url}: not a complete tar ({e} {where}): it was cut short or is damaged; "
                "copy or write it again"
            ) from None
    if key is not None:
        yield key, members


def _check_end(url: str, fh: Any, offset: int, last: str | None) -> None:
    """Refuse a tar whose member headers stop at byte ``offset`` without the end-of-archive
    marker, two 512-byte zero blocks (POSIX.1-1988 ustar): what follows is not an archive's end
    but a cut (a partial copy or upload) or damage.

    Raises:
        SourceError: naming the tar, the byte and the last member read.
    """
    fh.seek(offset)
    tail = fh.read(2 * tarfile.BLOCKSIZE)
    if tail == bytes(2 * tarfile.BLOCKSIZE):
        return
    after = f"after member {last!r}" if last else "before its first member"
    if any(tail[: tarfile.BLOCKSIZE]):
        what = "is cut inside" if len(tail) < tarfile.BLOCKSIZE else "has a damaged"
        problem = f"{what} the member header at byte {offset} ({after})"
    else:
        problem = (
            f"ends at byte {offset + len(tail)} ({after}) without its end-of-archive blocks "
            "(two 512-byte zero blocks): it was cut short"
        )
    raise SourceError(f"{url}: {problem}; samples may be missing, copy or write it again")


class WebDatasetSource(Source):
    """Samples of WebDataset tar shards (local, ``s3://``, ``gs://``, ``hf://``)."""

    def __init__(self, cfg: DatasetConfig) -> None:
        super().__init__(cfg)
        self.urls = expand_urls(cfg.manifest)
        if not self.urls:
            raise SourceError(f"{cfg.manifest}: the pattern names no tar shards")
        self.mask_ext = cfg.columns.mask.lower() if "." in cfg.columns.mask else None
        self.image_ext = cfg.columns.image.lower() if cfg.columns.image else None
        self._counts: list[int] | None = None
        self.found = f"WebDataset, {len(self.urls)} tar shard(s)"

    def _image_of(self, members: dict[str, Any]) -> str | None:
        if self.image_ext is not None:
            return self.image_ext if self.image_ext in members else None
        for ext in members:
            if ext != self.mask_ext and ext.rsplit(".", 1)[-1] in _IMAGE_EXTS:
                return ext
        return None

    def _meta(self, key: str, members: dict[str, Any]) -> dict[str, Any]:
        raw = members.get("json")
        if raw is None:
            return {}
        try:
            meta = json.loads(raw)
        except ValueError:
            return {"__error__": f"image {key!r}: its json member is not valid JSON"}
        return meta if isinstance(meta, dict) else {}

    def _record(self, url: str, key: str, members: dict[str, Any]) -> ImageRecord:
        meta = self._meta(key, members)
        ext = self._image_of(members)
        error = meta.get("__error__")
        if ext is None and error is None:
            error = f"image {key!r} ({url}): no image member ({sorted(members)})"
        label = meta.get(self.cfg.columns.label)
        fg = None
        if self.mask_ext is not None and members.get(self.mask_ext) is not None:
            fg = MaskBytes(
                members[self.mask_ext], f"{posixpath.basename(url)}#{key}.{self.mask_ext}"
            )
        return ImageRecord(
            image_id=key,
            path=f"{url}#{key}.{ext}",
            groups={g: None if meta.get(g) is None else str(meta[g]) for g in self.cfg.group_by},
            label=None if label is None else str(label),
            data=None if ext is None else members[ext],
            fg=fg,
            error=error,
        )

    def light(self, rows: int = 65536) -> Iterator[pa.Table]:
        counts = []
        for url in self.urls:
            ids, groups, labels, has = [], [], [], []
            for key, members in _samples(url, lambda ext, _pos: ext == "json"):
                meta = self._meta(key, members)
                ids.append(key)
                groups.append(
                    [None if meta.get(g) is None else str(meta[g]) for g in self.cfg.group_by]
                )
                label = meta.get(self.cfg.columns.label)
                labels.append(None if label is None else str(label))
                has.append(self.mask_ext is not None and self.mask_ext in members)
            counts.append(len(ids))
            yield pa.table(
                {
                    "image_id": pa.array(ids, pa.string()),
                    **{
                        f"group:{g}": pa.array([v[j] for v in groups], pa.string())
                        for j, g in enumerate(self.cfg.group_by)
                    },
                    "label": pa.array(labels, pa.string()),
                    "has_fg": pa.array(has, pa.bool_()),
                    "what": pa.array([url] * len(ids), pa.string()),
                },
                schema=light_schema(self.cfg.group_by),
            )
        self._counts = counts

    @property
    def num_rows(self) -> int:
        if self._counts is None:
            for _ in self.light():
                pass
        return sum(self._counts or [])

    def shards(self, size: int) -> list[ShardRef]:
        """Each tar's samples in ranges of at most ``size``; a shard never spans two tars."""
        n = self.num_rows  # noqa: F841 - fills the counts
        out, offset = [], 0
        for url, count in zip(self.urls, self._counts or [], strict=True):
            for start in range(0, count, size):
                k = len(out)
                out.append(
                    ShardRef(k, offset + start, offset + min(start + size, count), url, offset)
                )
            offset += count
        return out

    def read(self, ref: ShardRef) -> list[ImageRecord]:
        lo, hi = ref.start - ref.offset, ref.stop - ref.offset
        out, seen = [], 0
        for pos, (key, members) in enumerate(_samples(ref.part, lambda _e, p: lo <= p < hi)):
            seen = pos + 1
            if lo <= pos < hi:
                out.append(self._record(ref.part, key, members))
            if pos >= hi:
                break
        if len(out) != hi - lo:  # the tar changed since the driver counted its samples
            raise SourceError(
                f"{ref.part}: holds {seen} samples, but shard {ref.index} of the run needs "
                f"samples {lo}..{hi - 1}; was the tar replaced during the run? Run again"
            )
        return out

    def take(self, rows: Sequence[int]) -> list[ImageRecord]:
        got: dict[int, ImageRecord] = {}
        for ref in self.shards(1 << 30):  # one ref per tar
            inside = {r - ref.offset for r in rows if ref.start <= r < ref.stop}
            if not inside:
                continue
            for pos, (key, members) in enumerate(
                _samples(ref.part, lambda _e, p, s=inside: p in s)
            ):
                if pos in inside:
                    got[ref.offset + pos] = self._record(ref.part, key, members)
        return [got[r] for r in rows]

    def fetch(self, image_id: str, locator: str, mask: str | None) -> ImageRecord:
        url = locator.rpartition("#")[0]
        for key, members in _samples(url, lambda _e, _p: True):
            if key == image_id:
                return self._record(url, key, members)
        raise SourceError(f"image {image_id!r} is not in {url}")

    def fingerprint(self) -> str:
        from pipeline.storage.files import file_size

        return "webdataset " + ";".join(f"{u}={file_size(u)}" for u in self.urls)
