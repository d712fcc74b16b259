"""A command reads a bucket run folder with one listing of its shards: ``aggregate`` (and
``aggregate`` then ``report``, as ``run`` does) asks the store for ``maps/`` once, counted in the
request log of the S3 server (moto's, through werkzeug's logger)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from pipeline.audit.aggregate import aggregate
from pipeline.report.build import write_report
from pipeline.run.folder import RunFolder
from tests._data_helpers import moto_server, s3_put, use_s3
from tests._runfixtures import standard_rows, write_images, write_run

LIST = re.compile(r'"GET /audits/?\?[^"]*list-type=2')


@pytest.fixture
def bucket_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    local = write_run(tmp_path / "run", standard_rows(), ["room"], parts=3)
    write_images(local / "data", [r["image_id"] for r in standard_rows()])
    with moto_server() as endpoint:
        use_s3(monkeypatch, endpoint)
        files = {f"runs/one/{p.relative_to(local)}": p.read_bytes()
                 for p in local.rglob("*") if p.is_file() and p.suffix != ".png"}  # fmt: skip
        s3_put(endpoint, "audits", files)
        yield "s3://audits/runs/one"


def _listings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if LIST.search(r.getMessage())]


def test_aggregate_lists_a_bucket_run_once(bucket_run, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="werkzeug"):
        caplog.clear()
        summary = aggregate(bucket_run)
    assert summary["n"].sum() == len(standard_rows())
    maps = [m for m in _listings(caplog) if "prefix=runs/one/maps" in m]
    assert len(maps) == 1, _listings(caplog)


def test_aggregate_and_report_share_one_listing(bucket_run, caplog, tmp_path) -> None:
    with caplog.at_level(logging.INFO, logger="werkzeug"):
        caplog.clear()
        folder = RunFolder.of(bucket_run)
        aggregate(folder)
        write_report(folder, tmp_path / "report")
    maps = [m for m in _listings(caplog) if "prefix=runs/one/maps" in m]
    assert len(maps) == 1, _listings(caplog)
