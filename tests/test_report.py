"""The data-curation report: files, sentences, galleries, and the page in headless Chromium."""

from __future__ import annotations

import csv
import html
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.audit.aggregate import aggregate, read_summary
from pipeline.report.build import Limits, write_report
from tests._browser import chromium, probe_page, screenshot
from tests._runfixtures import make_row, standard_rows, write_images, write_run

MISSING_IMAGE = "kitchen-002"  # among kitchen's lowest ratios, so it is in the gallery


def _make_run(folder: Path) -> Path:
    rows = standard_rows()
    run_dir = write_run(folder / "run", rows, ["room"], parts=3)
    write_images(run_dir / "data", [r["image_id"] for r in rows if r["image_id"] != MISSING_IMAGE])
    return run_dir


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A fresh run each test may change."""
    return _make_run(tmp_path)


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run and its report for the tests that only read them (a report takes seconds)."""
    return _make_run(tmp_path_factory.mktemp("shared"))


@pytest.fixture(scope="module")
def report(shared_run: Path) -> Path:
    return write_report(shared_run, shared_run.parent / "report")


def _text(page: str) -> str:
    """Visible text of an HTML page, tags dropped and entities decoded, whitespace collapsed."""
    body = re.sub(r"<(style|script)\b.*?</\1>", " ", page, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", body)))


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_report_opens_with_what_was_flagged_and_why(report: Path) -> None:
    assert report.name == "index.html"
    assert {p.name for p in report.parent.iterdir()} == {
        "index.html",
        "report.js",
        "summary.csv",
        "flags.csv",
        "curation.csv",
        "review.csv",
        "groups",
        "img",
    }
    assert len(list((report.parent / "groups").glob("*.html"))) == 4  # a page per room
    text = _text(report.read_text(encoding="utf-8"))
    flagged = re.search(
        r"Room kitchen: the model relies on background — geometric-mean fg/bg ratio 0\.50 "
        r"\(95% CI (0\.\d\d)-(0\.\d\d)\) below the threshold 1\.0, q-value \S+ over 48 images",
        text,
    )
    assert flagged, text[:800]
    assert float(flagged.group(1)) < 0.5 < float(flagged.group(2)) < 1.0
    assert "Room hall: inconclusive" in text
    assert "A group is flagged when its q-value (Benjamini-Hochberg" in text  # the rule, once
    # the verdicts come first: before the group table, the charts and the run facts
    findings_end = text.index("Groups")
    assert text.index("Occlusion audit: test-run") < flagged.start() < findings_end
    assert "Room garage (6)" in text[:findings_end]  # too few images for a verdict, said so
    assert "Room bath:" not in text[:findings_end]


def test_report_sections_and_run_facts(report: Path) -> None:
    page = report.read_text(encoding="utf-8")
    text = _text(page)
    for heading in (
        "Groups",
        "Geometric-mean fg/bg ratio per group",
        "Per-image fg/bg ratios per group",
        "Most background-reliant images",
        "Run",
    ):
        assert f"<h2>{heading}</h2>" in page
    for fact in (
        "models/<tiny>.pt",
        "sha256:0123abcd",
        "images: 138",
        "total_s: 12.5",
    ):
        assert fact in text
    assert "Failures (2)" in text and "cannot decode image: EOF" in text
    table = page[
        page.index('<section id="groups">') : page.index("</section>", page.index("Groups"))
    ]
    assert table.count("<tr class=") == 4  # one row per room


def test_report_is_self_contained(report: Path) -> None:
    """Every page needs only files of its report folder, by relative links, and runs no inline
    script: its one script is the static report.js, which holds no data."""
    folder = report.parent
    pages = [report, *sorted((folder / "groups").glob("*.html"))]
    for path in pages:
        page = path.read_text(encoding="utf-8")
        policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page)
        assert policy, path
        rules = dict(r.strip().split(" ", 1) for r in policy.group(1).split(";"))
        assert rules["default-src"] == "'none'" and rules["script-src"] == "'self'"
        assert rules["img-src"] == "'self'" and "unsafe-inline" not in rules["script-src"]
        assert re.findall(r"<script\b[^>]*>", page) == [
            f'<script src="{"" if path == report else "../"}report.js" defer>'
        ]
        assert "<script src" in page and "</script>" in page and "<link" not in page
        assert not re.search(r'(src|href)="(https?:|data:|/)', page)  # relative links only
        for link in re.findall(r'(?:src|href)="([^"#]+)', page):
            assert (path.parent / html.unescape(link)).resolve().is_file(), (path, link)
    sources = re.findall(r'<img [^>]*src="([^"]*)"', report.read_text(encoding="utf-8"))
    assert len(sources) >= 2 + 6  # two charts and at least one gallery
    script = (folder / "report.js").read_text(encoding="utf-8")
    assert "kitchen" not in script and "fetch(" not in script and "http" not in script


def test_csv_files(report: Path, shared_run: Path) -> None:
    out = report.parent
    summary = pd.read_csv(out / "summary.csv")
    stored = read_summary(shared_run)
    assert list(summary.columns) == list(stored.columns)
    np.testing.assert_array_equal(summary["gmean_ratio"], stored["gmean_ratio"])

    flags = _read_csv(out / "flags.csv")
    assert [(f["room"], f["status"]) for f in flags] == [
        ("kitchen", "flagged"),
        ("hall", "inconclusive"),
    ]
    assert flags[0]["reason"].startswith("Room kitchen: the model relies on background")
    assert float(flags[0]["threshold"]) == 1.0


def test_curation_lists_low_ratios_then_undefined_then_errors(report: Path) -> None:
    rows = _read_csv(report.parent / "curation.csv")
    assert list(rows[0]) == [
        "image_id",
        "path",
        "room",
        "fg_bg_ratio",
        "fg_share",
        "status",
        "group_status",
        "reason",
    ]
    low = [r for r in rows if r["reason"].startswith("background-reliant")]
    ratios = [float(r["fg_bg_ratio"]) for r in low]
    assert ratios == sorted(ratios) and max(ratios) < 1.0
    assert rows[0]["image_id"] == "kitchen-000"  # the lowest ratio of all
    expected = sum(r["status"] == "ok" and 0 < r["fg_bg_ratio"] < 1 for r in standard_rows())
    assert len(low) == expected
    tail = [(r["image_id"], r["reason"]) for r in rows[len(low) :]]
    assert tail == [
        ("kitchen-nan0", "undefined ratio: foreground mask is empty"),
        ("kitchen-nan1", "undefined ratio: map is all zero"),
        ("kitchen-err0", "error: cannot decode image: EOF"),
        ("kitchen-err1", "error: mask missing: m.png"),
    ]
    assert {r["group_status"] for r in low if r["room"] == "kitchen"} == {"flagged"}


def test_curation_limit_keeps_the_lowest_and_every_problem(
    shared_run: Path, report: Path, tmp_path: Path
) -> None:
    limits = Limits(curation_limit=5, gallery_size=0)
    page = write_report(shared_run, tmp_path / "out", limits=limits)
    rows = _read_csv(tmp_path / "out" / "curation.csv")
    full = _read_csv(report.parent / "curation.csv")  # no limit reached: 10,000 by default
    assert [r["image_id"] for r in rows] == [r["image_id"] for r in full[:5]] + [
        "kitchen-nan0",
        "kitchen-nan1",
        "kitchen-err0",
        "kitchen-err1",
    ]
    n_low = len(full) - 4
    assert f"lists the 5 most background-reliant of the {n_low} images" in _text(
        page.read_text(encoding="utf-8")
    )


def test_galleries_show_the_most_background_reliant_images(report: Path) -> None:
    page = report.read_text(encoding="utf-8")
    galleries = page[page.index('<section id="galleries">') : page.index('<section id="run">')]
    groups = re.findall(
        r'<div class="group" data-status="(\w+)">\s*<h3><a href="(groups/[^"]+)">([^<]*)', galleries
    )
    assert [(s, label.strip()) for s, _, label in groups] == [
        ("flagged", "Room kitchen"),
        ("inconclusive", "Room hall"),
    ]
    kitchen = galleries[: galleries.index("Room hall")]
    shown = re.findall(r"<figcaption>(kitchen-\d+): fg/bg ratio", kitchen)
    assert shown == [f"kitchen-{i:03d}" for i in range(6)]  # lowest ratios first
    # the missing file is a placeholder with the loader's message; the rest are drawn
    placeholders = re.findall(r'<div class="ph">([^<]*)</div>', galleries)
    assert len(placeholders) == 1
    assert MISSING_IMAGE in placeholders[0] and "not found" in html.unescape(placeholders[0])
    # each drawn image three ways: the picture, its map, and the map over the picture
    figures = re.findall(
        r'<figure class="item" id="img-\w+"><div class="panels">(.*?)</div>', kitchen, re.S
    )
    assert len(figures) == 5
    for panels in figures:
        sources = re.findall(r'src="(img/[^"]+)"', panels)
        assert len(sources) == 4 and sources[0] == sources[2] and sources[1] == sources[3]
        assert sources[0].endswith(".jpg") and sources[1].endswith("-map.png")
    assert "[mask:" not in galleries and "[map:" not in galleries  # masks and maps all drawn
    # the group page lists every image of the room, lowest ratio first, and draws them
    kitchen_page = (report.parent / groups[0][1]).read_text(encoding="utf-8")
    listed = re.findall(r'<tr><td class="t">(?:<a href="#img-\w+">)?([\w-]+)<', kitchen_page)
    assert len(listed) == 52 and listed[:6] == [f"kitchen-{i:03d}" for i in range(6)]
    assert listed[-4:] == ["kitchen-nan0", "kitchen-nan1", "kitchen-err0", "kitchen-err1"]
    assert kitchen_page.count('<figure class="item" id="img-') == 48 + 2 - 1  # not the missing


def test_default_folder_is_reports_run_name_under_cwd(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    assert write_report(run) == repo / "reports" / "test-run" / "index.html"

    info = json.loads((run / "run.json").read_text())
    info["config"]["output"]["report_dir"] = str(tmp_path / "elsewhere")
    (run / "run.json").write_text(json.dumps(info))
    assert write_report(run) == tmp_path / "elsewhere" / "index.html"


def test_summary_is_computed_when_missing_and_overrides_are_honoured(
    run: Path, tmp_path: Path
) -> None:
    assert not (run / "summary.parquet").exists()
    write_report(run, tmp_path / "a")
    assert (run / "summary.parquet").exists()

    lenient = aggregate(run, threshold=0.4, write=False)
    page = write_report(run, tmp_path / "b", summary=lenient).read_text(encoding="utf-8")
    text = _text(page)
    assert "No group was flagged or inconclusive" in text
    assert "threshold 0.4" in text
    assert _read_csv(tmp_path / "b" / "flags.csv") == []
    assert '<section id="galleries">' not in page


def test_text_from_data_is_escaped(tmp_path: Path) -> None:
    nasty = '<img src=x onerror="alert(1)">&co'
    rows = [make_row(f"n{i}", {"room": nasty}, 0.3 + 0.01 * i) for i in range(25)]
    rows.append(make_row("n-err", {"room": nasty}, math.nan, error="<b>broken</b>"))
    run = write_run(tmp_path / "run", rows, ["room"], name="run", extra={"name": "<run>"})
    page = write_report(run, tmp_path / "out").read_text(encoding="utf-8")
    assert nasty not in page and "<b>broken</b>" not in page
    assert html.escape(nasty) in page
    assert "<title>Occlusion audit: &lt;run&gt;</title>" in page
    # the missing images become placeholders; the page still renders every group
    assert page.count('<div class="ph">') == 6


def test_no_pyplot_global_state(shared_run: Path, tmp_path: Path) -> None:
    code = (
        "import sys; from pipeline.report.build import write_report; "
        f"write_report({str(shared_run)!r}, {str(tmp_path / 'out')!r}); "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# The probe is added to a copy of the page: it records load errors, blocked requests and
# images that did not decode, then writes the results onto <body> for --dump-dom to show.
@pytest.mark.browser
@pytest.mark.skipif(chromium() is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    page = report.read_text(encoding="utf-8")
    attrs, dom = probe_page(report, tmp_path)
    assert json.loads(attrs["data-problems"]) == []
    assert json.loads(attrs["data-requests"]) == []  # nothing but the report's own files
    assert json.loads(attrs["data-broken"]) == []  # every <img> decoded (naturalWidth > 0)
    assert int(attrs["data-images"]) == page.count("<img ")
    assert int(attrs["data-images"]) >= 2 + 11  # charts + kitchen (5 + placeholder) + hall (6)
    rendered = _text(dom)
    assert "Room kitchen: the model relies on background" in rendered
    assert re.search(r'<li class="flagged">', dom)

    shot = screenshot(report, tmp_path / "report.png", tmp_path)
    assert shot.stat().st_size > 10_000
    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 5  # something was drawn, not a blank page


def test_the_run_section_draws_the_actor_timeline(tmp_path: Path) -> None:
    """A pool that scaled up on a cold cluster and lost a node: the plan in the run facts, the
    timeline as a figure with what it says in its caption."""
    node = "fffffffffffffffffffffffffffffffffffffffffffffffffff0000"

    def up(actor: int, n: int, t0: float, t1: float, shards: int, end: str) -> dict:
        where = {"node_id": f"{node}{n}", "gpu_ids": ["0"], "device": "cuda"}
        return {"actor": actor, "up_s": t0, "down_s": t1, "shards": shards, "end": end, **where}

    why = "the autoscaler can start GPU nodes: gpu (up to 3 x {CPU: 1, GPU: 1})"
    pool = {"device": "cuda", "why": why, "actors": 3, "num_gpus": 1.0, "num_cpus": 0.5,
            "threads": None, "per_actor": 2, "created_at": "2025-01-01T00:00:00+00:00"}  # fmt: skip
    actors = [
        up(0, 1, 8.0, 40.0, 9, "released"),
        up(1, 2, 9.5, 20.0, 3, "preempted"),
        up(2, 3, 11.0, 40.0, 8, "released"),
        up(1, 4, 31.0, 40.0, 2, "released"),  # actor 1 again, on the node that replaced node 2
    ]
    run_dir = write_run(tmp_path / "run", standard_rows(), ["room"], extra={"pool": pool,
                        "actors": actors})  # fmt: skip
    page = write_report(run_dir, tmp_path / "report").read_text(encoding="utf-8")
    run = page[page.index('<section id="run">') :]
    assert '<figure class="chart" id="actor-timeline"><img src="img/actor-timeline.png"' in run
    assert (tmp_path / "report" / "img" / "actor-timeline.png").stat().st_size > 5_000
    text = _text(run)
    assert f"Pool cuda ({why}); up to 3 actor(s) of 1 GPU and 0.5 CPU each" in text
    assert "asked for up to 3 cuda actor(s)" in text and "3 came up" in text
    assert "22 of 22 shard(s) were computed on GPU actors" in text


def test_a_report_in_a_bucket_holds_every_file_its_pages_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report folder in a bucket is served as it is: the pages, report.js and every figure
    are objects under the report's prefix, and every link of every page resolves to one."""
    import posixpath

    import boto3

    from tests._data_helpers import moto_server, use_s3

    rows = [make_row(f"k{i:02d}", {"room": "kitchen"}, 0.4 + 0.01 * i) for i in range(20)]
    rows += [make_row(f"b{i:02d}", {"room": "bath"}, 2.0 + 0.01 * i) for i in range(20)]
    run = write_run(tmp_path / "run", rows, ["room"])
    write_images(run / "data", [r["image_id"] for r in rows])

    with moto_server() as endpoint:
        use_s3(monkeypatch, endpoint)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="reports")
        index = write_report(run, "s3://reports/val/night")
        assert index == "s3://reports/val/night/index.html"
        listed = client.list_objects_v2(Bucket="reports", Prefix="val/night/", MaxKeys=1000)
        keys = {o["Key"].removeprefix("val/night/") for o in listed["Contents"]}
        pages = {k: client.get_object(Bucket="reports", Key=f"val/night/{k}")["Body"].read()
                 for k in keys if k.endswith(".html")}  # fmt: skip
    assert {"index.html", "report.js", "review.csv"} <= keys and len(pages) == 1 + 2
    for name, body in pages.items():
        for link in re.findall(r'(?:src|href)="([^"#]+)', body.decode("utf-8")):
            target = posixpath.normpath(
                posixpath.join(posixpath.dirname(name), html.unescape(link))
            )
            assert target in keys, (name, link)


def test_strategies_grouped_otherwise_than_the_report_are_shown_on_the_index(
    tmp_path: Path,
) -> None:
    """``discover`` by label on a run the report groups by room: the index still shows the
    clusters, their examples linked to the room pages that draw them."""
    from tests._manygroups import strategies_table

    rows = standard_rows()
    run = write_run(tmp_path / "run", rows, ["room"])
    write_images(run / "data", [r["image_id"] for r in rows])
    ok = [r for r in rows if r["status"] == "ok" and r["fg_bg_ratio"] == r["fg_bg_ratio"]]
    strategies_table(ok).to_parquet(run / "strategies.parquet", index=False)
    index = write_report(run, tmp_path / "report")
    page = index.read_text(encoding="utf-8")
    section = page[page.index('<section id="strategies">') : page.index('<section id="galleries">')]
    assert "<h3>label 1</h3>" in section and section.count('class="item strategy"') == 1
    links = re.findall(r'<a href="(groups/[^"#]+)#(img-\w+)"><img class="thumb"', section)
    assert len(links) == 3
    for href, anchor in links:
        assert f'id="{anchor}"' in (index.parent / href).read_text(encoding="utf-8")
