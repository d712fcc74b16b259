"""Stored results load unchanged in pandas, pyarrow, DuckDB and polars."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import polars as pl
import pyarrow.csv as pa_csv
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.audit.aggregate import aggregate
from pipeline.report.build import Limits, write_report
from pipeline.schema import IMAGE_METRICS, maps_schema, summary_schema
from tests._runfixtures import standard_rows, write_run

GROUP_BY = ["room"]
MAP_COLUMNS = ["image_id", "room", "status", "error", "grid_h", *IMAGE_METRICS, "metric_note"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = write_run(tmp_path_factory.mktemp("fmt") / "run", standard_rows(), GROUP_BY, parts=4)
    aggregate(run_dir)
    write_report(run_dir, run_dir.parent / "report", limits=Limits(gallery_size=0))
    return run_dir


def _norm(value: Any) -> Any:
    """One spelling of "no value" across libraries: NaN, None and pandas' NA all become None."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def _rows(columns: list[str], records: list[tuple]) -> list[tuple]:
    return [tuple(_norm(v) for v in r) for r in records]


def _from_pandas(df: pd.DataFrame, columns: list[str]) -> list[tuple]:
    return _rows(columns, list(df[columns].itertuples(index=False, name=None)))


def _from_duckdb(query: str, columns: list[str]) -> list[tuple]:
    con = duckdb.connect()
    try:
        cursor = con.execute(query)
        names = [d[0] for d in cursor.description]
        records = cursor.fetchall()
    finally:
        con.close()
    return _rows(columns, [tuple(r[names.index(c)] for c in columns) for r in records])


def _from_polars(df: pl.DataFrame, columns: list[str]) -> list[tuple]:
    return _rows(columns, df.select(columns).rows())


def _sorted(rows: list[tuple]) -> list[tuple]:
    return sorted(rows, key=lambda r: r[0])


def test_maps_parts_load_the_same_everywhere(run: Path) -> None:
    maps = run / "maps"
    files = sorted(maps.glob("part-*.parquet"))
    assert len(files) == 4
    for f in files:
        assert pq.read_schema(f).equals(maps_schema(GROUP_BY))
    cols = MAP_COLUMNS
    expected = _sorted(_from_pandas(pd.DataFrame(standard_rows()), cols))
    glob = str(maps / "part-*.parquet")

    by_pandas = _from_pandas(pd.read_parquet(maps), cols)
    by_arrow = _from_pandas(ds.dataset(maps, format="parquet").to_table().to_pandas(), cols)
    by_duckdb = _from_duckdb(f"SELECT * FROM read_parquet('{glob}')", cols)
    by_polars = _from_polars(pl.read_parquet(glob), cols)
    for got in (by_pandas, by_arrow, by_duckdb, by_polars):
        assert len(got) == 138
        assert _sorted(got) == expected

    # the list<float32> delta grids survive too (compared as float32 values)
    first = pq.read_table(files[0]).slice(0, 3)
    ids = first.column("image_id").to_pylist()
    deltas = first.column("delta").to_pylist()
    in_list = ", ".join(f"'{i}'" for i in ids)
    duck = dict(
        _from_duckdb(
            f"SELECT image_id, delta FROM read_parquet('{glob}') WHERE image_id IN ({in_list})",
            ["image_id", "delta"],
        )
    )
    polar = dict(
        pl.read_parquet(glob)
        .filter(pl.col("image_id").is_in(ids))
        .select("image_id", "delta")
        .rows()
    )
    for image_id, delta in zip(ids, deltas, strict=True):
        assert duck[image_id] == pytest.approx(delta, rel=0, abs=0)
        assert list(polar[image_id]) == pytest.approx(delta, rel=0, abs=0)


def test_summary_parquet_and_csv_load_the_same_everywhere(run: Path) -> None:
    path, csv_path = run / "summary.parquet", run.parent / "report" / "summary.csv"
    assert pq.read_schema(path).equals(summary_schema(GROUP_BY))
    cols = summary_schema(GROUP_BY).names
    reference = _from_pandas(pq.read_table(path).to_pandas(), cols)
    assert len(reference) == 4

    parquet_reads = {
        "pandas": _from_pandas(pd.read_parquet(path), cols),
        "pyarrow": _from_pandas(ds.dataset(path).to_table().to_pandas(), cols),
        "duckdb": _from_duckdb(f"SELECT * FROM read_parquet('{path}')", cols),
        "polars": _from_polars(pl.read_parquet(path), cols),
    }
    csv_reads = {
        "pandas": _from_pandas(pd.read_csv(csv_path), cols),
        "pyarrow": _from_pandas(pa_csv.read_csv(csv_path).to_pandas(), cols),
        "duckdb": _from_duckdb(f"SELECT * FROM read_csv('{csv_path}')", cols),
        "polars": _from_polars(pl.read_csv(csv_path), cols),
    }
    for name, got in {**parquet_reads, **{f"csv/{k}": v for k, v in csv_reads.items()}}.items():
        # same rows in the same order, floats bit for bit (CSV floats are written round-trip)
        assert got == reference, name


def test_report_csv_files_load_everywhere(run: Path) -> None:
    out = run.parent / "report"
    low = sum(r["status"] == "ok" and 0 < r["fg_bg_ratio"] < 1 for r in standard_rows())
    for name, rows in (("flags.csv", 2), ("curation.csv", low + 4)):  # + 2 NaN, 2 error rows
        path = out / name
        counts = {
            len(pd.read_csv(path)),
            pa_csv.read_csv(path).num_rows,
            _from_duckdb(f"SELECT count(*) AS n FROM read_csv('{path}')", ["n"])[0][0],
            pl.read_csv(path).height,
        }
        assert counts == {rows}, name
