"""Report folders anywhere: pages are written into a local folder, then, for a bucket
(``s3://``, ``gs://``), each file is uploaded whole under the same name."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.storage.paths import base_name
from pipeline.storage.store import Store

__all__ = ["join", "local_out", "report_dir"]


def join(folder: str | os.PathLike[str], name: str) -> str:
    """``folder/name`` for a local path or a URI."""
    return f"{str(folder).rstrip('/')}/{name}"


@contextlib.contextmanager
def local_out(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A local folder to write a page into; for a bucket target, a temporary one whose files
    (subfolders included: figures, group pages) are uploaded to ``target`` under the same
    relative names when the block ends without an error. The pages (``*.html``) go last, the
    top folder's last of all, so a page in the bucket never links to a figure not yet there."""
    store = Store(target)
    if not store.remote:
        out = store.local()
        out.mkdir(parents=True, exist_ok=True)
        yield out
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        yield root
        files = [f for f in root.rglob("*") if f.is_file()]
        files.sort(key=lambda f: (f.suffix == ".html", f.parent == root, f.as_posix()))
        for f in files:
            store.write_bytes(f.relative_to(root).as_posix(), f.read_bytes())


def report_dir(out_dir: str | os.PathLike[str] | None, record: Any, run_dir: Any) -> str:
    """The report folder (a local path or an ``s3://``/``gs://`` URI): ``out_dir``, else the
    run's ``output.report_dir``, else ``reports/<run name>`` under the current directory."""
    if out_dir is not None:
        return str(out_dir)
    if record is not None and record.config.output.report_dir:
        return str(record.config.output.report_dir)
    name = record.name if record is not None else base_name(run_dir)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "run"
    return str(Path.cwd() / "reports" / safe)
