"""``occlusion-audit export`` on a real run: CSV cells a spreadsheet would run are escaped."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import aggregate, load_config, read_maps, run_audit
from pipeline.cli import main
from tests._dataset import audit_config, image_set_with_model

pytestmark = pytest.mark.slow

N = 24
REPO = Path(__file__).resolve().parents[1]
# what a spreadsheet runs as a formula when a cell starts with it (OWASP, "CSV Injection")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
IDS = ['=HYPERLINK("http://x.example","open")', "+1", "-2+3", "@SUM(1)", "\tid", "\rid"]
GROUPS = ['=HYPERLINK("http://x.example","room")', "+room", "-room", "@room", "\troom", "\rroom"]
LABELS = ["=1+1", "-2+3", "@SUM(1)", "+4", "\t5", "\r6"]


@pytest.fixture(scope="module")
def run(local_ray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run over 24 images whose ids, groups and labels start like formulas."""
    root = image_set_with_model(tmp_path_factory.mktemp("export-run"), n=N)
    table = pq.read_table(root / "manifest.parquet")
    ids = [f"{IDS[i % 6]}-{i:02d}" for i in range(N)]
    groups = [GROUPS[i % 6] for i in range(N)]
    labels = [LABELS[i % 6] for i in range(N)]
    for name, values in (("image_id", ids), ("room", groups), ("label", labels)):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values))
    pq.write_table(table, root / "manifest.parquet")
    cfg = audit_config(
        root,
        root / "run",
        occlusion={"window": [8, 8], "stride": [8, 8], "n_baselines": 1, "baseline": "mean"},
        counterfactual={"enabled": False},
        cluster={"shard_size": 12, "actors": 1},
    )
    result = run_audit(load_config(cfg), progress=False)
    assert (result.images, result.ok) == (N, N)
    aggregate(root / "run")
    return root / "run"


def _cells(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def test_csv_export_escapes_every_cell_a_spreadsheet_would_run(run, tmp_path, capsys) -> None:
    out = tmp_path / "export.csv"
    assert main(["export", str(run), "--to", "csv", "--out", str(out)]) == 0
    rows = _cells(out)
    assert len(rows) == N + 1
    formulas = [c for row in rows for c in row if c.startswith(FORMULA_START) and not _is_number(c)]
    assert formulas == []  # numbers (a negative score) stay numbers; no text runs as a formula
    header, body = rows[0], rows[1:]
    column = {name: [r[header.index(name)] for r in body] for name in ("image_id", "room", "label")}
    maps = read_maps(run, columns=["image_id", "room", "label"])
    for name, values in column.items():
        assert values == ["'" + v for v in maps[name]], name  # one leading ' and nothing else
    # the same escaping as the report's own CSV files (one helper)
    report = tmp_path / "report"
    assert main(["report", str(run), "--out", str(report)]) == 0
    curation = {r[0] for r in _cells(report / "curation.csv")[1:]}
    assert curation and curation <= set(column["image_id"])
