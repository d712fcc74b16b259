"""The report, compare and history pages of a validation set: 1,000 classes of 3 tiny images.

Runs are built by hand (``tests/_manygroups.py``): no Ray, no model. The pages must stay small,
reach every group, and work in headless Chromium: the tables sort and filter, a group page
shows its images with the map over them, nothing fails in the console and no request leaves
the report folder. Timing is measured by ``benchmarks/report_scaling.py``, not here.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.audit.aggregate import read_summary
from pipeline.audit.compare import compare_runs
from pipeline.audit.history import find_runs, run_history
from pipeline.report.build import write_report
from pipeline.report.compare_page import write_comparison
from pipeline.report.history_page import write_history
from tests._browser import chromium, probe_page
from tests._manygroups import class_names, write_many_groups

GROUPS = 1000
# night 2: every 50th class from the 7th regresses (a new flag), every 50th from the 1st recovers
CHANGE = {**{k: 0.15 for k in range(7, GROUPS, 50)}, **{k: 8.0 for k in range(1, GROUPS, 50)}}
needs_chromium = pytest.mark.skipif(chromium() is None, reason="chromium is not installed")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two nights of one validation set: the second moves 40 classes."""
    root = tmp_path_factory.mktemp("many")
    data = root / "data"
    nights = {"night-1": None, "night-2": CHANGE}
    for day, (name, change) in enumerate(nights.items(), start=1):
        write_many_groups(root / "runs" / name, GROUPS, change=change, images=data,
                          started_at=f"2026-12-0{day}T02:00:00+00:00")  # fmt: skip
    return root / "runs"


@pytest.fixture(scope="module")
def report(runs: Path) -> Path:
    return write_report(runs / "night-2", runs.parent / "report")


def _recorded(attrs: dict[str, str], *names: str) -> dict[str, object]:
    """What the probe's actions recorded (``record(name, value)``), by name."""
    return {n: json.loads(attrs[f"data-{n}"]) for n in names}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_thousand_groups_make_a_small_index_and_a_page_per_group(report: Path, runs: Path):
    folder = report.parent
    page = report.read_text(encoding="utf-8")
    assert report.stat().st_size < 5_000_000  # opens at once
    summary = read_summary(runs / "night-2")
    pages = sorted(folder.glob("groups/*.html"))
    assert len(pages) == GROUPS
    table = page[page.index('<table class="sortable" id="group-table">') :]
    table = table[: table.index("</table>")]
    links = re.findall(r'<td class="t" data-v="[^"]*"><a href="(groups/[^"]+)">', table)
    assert len(set(links)) == GROUPS and {folder / p for p in links} == set(pages)  # reachable
    # class names, not indices: the names run.json recorded for the label column
    names = class_names(GROUPS)
    first = summary[summary["status"] == "flagged"].iloc[0]["label"]
    assert f">{names['17']}</a>" in table and f"Label {names[first]} ({first})" in page
    # galleries are bounded: the first 12 flagged groups, most reliant first
    galleries = page[page.index('<section id="galleries">') : page.index('<section id="run">')]
    shown = re.findall(r'<div class="group" data-status="(\w+)">', galleries)
    flagged = summary[summary["status"] == "flagged"]
    assert shown == ["flagged"] * 12 and len(flagged) > 12
    top = re.search(r"<h3><a href=\"[^\"]+\">Label [^<]+ \((\d+)\)</a>", galleries)
    assert top and top.group(1) == flagged.iloc[0]["label"]  # the lowest ratio first
    assert f"{len(flagged) + (summary['status'] == 'inconclusive').sum() - 12} more" in galleries
    # the figures are files beside the page, and the page links to nothing else
    assert "data:image" not in page and not re.search(r'(src|href)="(https?:|/)', page)
    assert len(list((folder / "img").iterdir())) > 2 * GROUPS * 3


@pytest.mark.slow
def test_the_review_queue_puts_the_clearest_cases_first(report: Path):
    rows = _rows(report.parent / "review.csv")
    assert list(rows[0]) == ["rank", "image_id", "path", "label", "class", "group_status",
                             "fg_bg_ratio", "swap_flip", "bg_reliance", "strategy", "why",
                             "page"]  # fmt: skip
    reasons = [r["why"].count(";") + 1 for r in rows]
    assert reasons == sorted(reasons, reverse=True)  # more reasons first
    top = rows[0]
    assert top["why"].startswith("low ratio") and "swap flips 50%" in top["why"]
    assert "off-object strategy" in top["why"] and top["group_status"] == "flagged"
    assert (report.parent / top["page"]).exists() and top["class"] == class_names(GROUPS)[
        top["label"]
    ]
    page = report.read_text(encoding="utf-8")
    assert f"of {len(rows)} are below" in page
    assert len(re.findall(r'<tr class="\w+">', page[page.index('id="review-table"') :])) >= 50


@pytest.mark.slow
@pytest.mark.browser
@needs_chromium
def test_the_group_table_sorts_and_filters_in_chromium(report: Path, tmp_path: Path):
    actions = """
    const table = document.getElementById('group-table');
    const keys = Array.from(table.tHead.rows[0].cells).map((th) => th.dataset.key);
    const shown = () => Array.from(table.tBodies[0].rows).filter((r) => !r.hidden);
    const cell = (r, key) => r.cells[keys.indexOf(key)];
    const sortValues = (key) => shown().map((r) => cell(r, key).getAttribute('data-v'));
    const click = (key) => table.querySelector('th[data-key="' + key + '"] button').click();
    click('ratio'); record('ratio-up', sortValues('ratio'));
    click('ratio'); record('ratio-down', sortValues('ratio'));
    click('q'); record('q-up', sortValues('q'));
    click('bg_reliance'); record('reliance-up', sortValues('bg_reliance'));
    click('class'); record('class-up', shown().map((r) => cell(r, 'class').textContent));
    const box = document.querySelector('div.filters[data-for="group-table"]');
    const set = (selector, value, kind) => {
      const control = box.querySelector(selector);
      control.value = value;
      control.dispatchEvent(new Event(kind, {bubbles: true}));
    };
    set('select[data-key="status"]', 'flagged', 'change');
    record('flagged', shown().map((r) => cell(r, 'status').textContent.trim()));
    record('count', box.querySelector('output').textContent);
    set('input[data-key="ratio"]', '0.3', 'input');
    record('flagged-below', sortValues('ratio'));
    set('select[data-key="status"]', '', 'change');
    set('input[data-key="ratio"]', '', 'input');
    set('input[data-filter="text"]', 'fox', 'input');
    record('fox', shown().map((r) => cell(r, 'class').textContent));
    record('filters-shown', !box.hidden);
    """
    attrs, _ = probe_page(report, tmp_path, actions)
    assert json.loads(attrs["data-problems"]) == [] and json.loads(attrs["data-broken"]) == []
    assert json.loads(attrs["data-requests"]) == []  # no request leaves the report folder
    got = _recorded(attrs, "ratio-up", "ratio-down", "q-up", "reliance-up", "class-up",
                    "flagged", "count", "flagged-below", "fox", "filters-shown")  # fmt: skip

    def numbers(values: list[str]) -> list[float]:
        return [float(v) for v in values if v]

    up, down = numbers(got["ratio-up"]), numbers(got["ratio-down"])
    assert len(up) == GROUPS and up == sorted(up) and down == sorted(up, reverse=True)
    assert numbers(got["q-up"]) == sorted(numbers(got["q-up"]))
    assert numbers(got["reliance-up"]) == sorted(numbers(got["reliance-up"]))
    assert got["class-up"] == sorted(got["class-up"], key=str.lower)
    summary = read_summary(report.parents[1] / "runs" / "night-2")
    n_flagged = int((summary["status"] == "flagged").sum())
    assert got["flagged"] == ["flagged"] * n_flagged
    assert got["count"] == f"{n_flagged} of {GROUPS} shown"
    below = numbers(got["flagged-below"])
    assert below and max(below) <= 0.3
    expected = sum(1 for n in class_names(GROUPS).values() if "fox" in n)
    assert len(got["fox"]) == expected and all("fox" in n for n in got["fox"])
    assert got["filters-shown"] is True


@pytest.mark.slow
@pytest.mark.browser
@needs_chromium
def test_a_group_page_shows_its_images_with_the_map_over_them(report: Path, tmp_path: Path):
    top = _rows(report.parent / "review.csv")[0]
    page = report.parent / top["page"]
    actions = """
    const slider = document.querySelector('input[data-opacity]');
    record('slider-shown', slider.closest('[hidden]') === null);
    slider.value = '20';
    slider.dispatchEvent(new Event('input', {bubbles: true}));
    const maps = Array.from(document.querySelectorAll('.overlay img.map'));
    record('opacity', maps.map((m) => getComputedStyle(m).opacity));
    record('cards', document.querySelectorAll('figure.item[id^="img-"]').length);
    record('swaps', document.querySelectorAll('#swaps figure').length);
    record('tiles', document.querySelectorAll('#strategies figure.strategy').length);
    record('ids', Array.from(document.querySelectorAll('#image-table tbody tr'))
      .map((r) => r.cells[0].textContent));
    """
    attrs, dom = probe_page(page, tmp_path, actions)
    assert json.loads(attrs["data-problems"]) == [] and json.loads(attrs["data-broken"]) == []
    assert json.loads(attrs["data-requests"]) == []
    got = _recorded(attrs, "slider-shown", "opacity", "cards", "swaps", "tiles", "ids")
    assert got["cards"] == 3 and int(attrs["data-images"]) >= 3 * 4  # picture, map, overlay
    assert got["slider-shown"] is True and got["opacity"] == ["0.2"] * 3
    assert got["swaps"] >= 1 and got["tiles"] >= 1
    rows = pd.read_parquet(report.parents[1] / "runs" / "night-2" / "maps")
    mine = rows[rows["label"] == top["label"]].sort_values("fg_bg_ratio")
    assert got["ids"] == list(mine["image_id"])  # every image, lowest ratio first
    assert "← Occlusion audit: night-2" in dom and class_names(GROUPS)[top["label"]] in dom


@pytest.mark.slow
@pytest.mark.browser
@needs_chromium
def test_compare_at_a_thousand_groups_puts_changed_groups_first(runs: Path, tmp_path: Path):
    c = compare_runs(runs / "night-1", runs / "night-2", bootstrap=500)
    out = write_comparison(c, tmp_path / "compare")
    page = (out / "compare.html").read_text(encoding="utf-8")
    assert (out / "compare.html").stat().st_size < 2_000_000
    verdicts = re.findall(r'<tr class="([\w-]+)">', page[page.index('id="compare-table"') :])
    assert len(verdicts) == GROUPS
    changed = [v for v in verdicts if v != "unchanged"]
    assert changed and verdicts[: len(changed)] == changed  # every changed group before the rest
    assert set(changed) >= {"new-flag", "cleared"}
    actions = """
    const box = document.querySelector('div.filters[data-for="compare-table"]');
    const select = box.querySelector('select[data-key="verdict"]');
    select.value = 'new-flag';
    select.dispatchEvent(new Event('change', {bubbles: true}));
    record('count', box.querySelector('output').textContent);
    """
    attrs, _ = probe_page(out / "compare.html", tmp_path, actions)
    assert json.loads(attrs["data-problems"]) == [] and json.loads(attrs["data-broken"]) == []
    assert json.loads(attrs["data-requests"]) == []
    assert json.loads(attrs["data-count"]) == f"{verdicts.count('new-flag')} of {GROUPS} shown"


@pytest.mark.slow
@pytest.mark.browser
@needs_chromium
def test_history_at_a_thousand_groups_puts_changed_groups_first(runs: Path, tmp_path: Path):
    history = run_history(find_runs([runs]))
    out = write_history(history, tmp_path / "history")
    page = (out / "history.html").read_text(encoding="utf-8")
    assert len(pd.read_parquet(out / "history.parquet")) == 2 * GROUPS
    body = page[page.index('id="history-table"') :]
    flags = re.findall(r"<tr( data-changed=\"yes\")?>", body)[1:]  # past the header
    assert len(flags) == GROUPS
    n_changed = sum(1 for f in flags if f)
    assert n_changed >= 20 and all(flags[:n_changed])  # changed groups first
    assert class_names(GROUPS)["7"] in page  # a regressed class, by name
    actions = """
    const box = document.querySelector('div.filters[data-for="history-table"]');
    const flag = box.querySelector('input[data-filter="flag"]');
    flag.checked = true;
    flag.dispatchEvent(new Event('change', {bubbles: true}));
    record('count', box.querySelector('output').textContent);
    """
    attrs, _ = probe_page(out / "history.html", tmp_path, actions)
    assert json.loads(attrs["data-problems"]) == [] and json.loads(attrs["data-broken"]) == []
    assert json.loads(attrs["data-requests"]) == []
    assert json.loads(attrs["data-count"]) == f"{n_changed} of {GROUPS} shown"


def test_the_drawn_map_is_the_kernels_map():
    """The report draws maps with numpy (:func:`display_map`); they equal ``expand_map``'s."""
    from pipeline.kernel.geometry import WindowGrid
    from pipeline.kernel.occlusion import expand_map
    from pipeline.report.assets import display_map

    rng = np.random.default_rng(0)
    cases = [((3, 17, 23), [1, 5, 4], [1, 3, 2]), ((3, 9, 9), [3, 4, 4], [3, 4, 4]),
             ((1, 10, 7), [1, 3, 7], [1, 2, 7]), ((3, 32, 32), [3, 8, 8], [3, 4, 4])]  # fmt: skip
    for image, window, stride in cases:
        grid = WindowGrid.create(image, window, stride)
        delta = rng.normal(size=grid.counts).ravel().tolist()
        row = {"image_c": image[0], "image_h": image[1], "image_w": image[2], "window": window,
               "stride": stride, "delta": delta}  # fmt: skip
        np.testing.assert_allclose(display_map(row), expand_map(row), atol=1e-6)


def test_the_review_queue_orders_by_reasons_then_status_then_ratio():
    from pipeline.report.review import review_queue

    images = pd.DataFrame(
        {
            "image_id": ["a", "b", "c", "d", "e", "f"],
            "status": ["ok", "ok", "ok", "ok", "error", "ok"],
            "fg_bg_ratio": [0.5, 0.2, 0.9, 2.0, np.nan, 3.0],
            "swap_flip": [0.5, 0.0, 0.0, 0.25, np.nan, 0.0],
        }
    )
    status = ["ok", "ok", "flagged", "ok", "flagged", "ok"]
    queue = review_queue(images, status, {"d": "3#1 (off the object)"}, threshold=1.0)
    # two reasons (lowest ratio first), then one in a flagged group, then one in an ok group;
    # f has no reason, e failed
    assert list(queue["image_id"]) == ["a", "d", "c", "b"]
    assert list(queue["rank"]) == [1, 2, 3, 4]
    assert queue.iloc[1]["why"] == (
        "swap flips 25% of its class's backgrounds; off-object strategy 3#1 (off the object)"
    )
    assert queue.iloc[2]["why"] == "low ratio 0.9 < 1"


# export as the CLI does, then read the saved view back: one process, one FiftyOne import
_EXPORT_AND_READ = """
import json, sys
from pipeline.cli import main
assert main(["export", sys.argv[1], "--to", "fiftyone", "--dataset", "val"]) == 0
import fiftyone as fo
view = fo.load_dataset("val").load_saved_view("occlusion-review")
print(json.dumps([s["image_id"] for s in view]))
"""


@pytest.mark.slow
def test_export_to_fiftyone_saves_the_review_queue_as_a_view(tmp_path: Path):
    """``export --to fiftyone`` saves the queue, in its order, as a view; the report names it."""
    pytest.importorskip("fiftyone")
    from tests._data_helpers import mongod_server

    run = write_many_groups(tmp_path / "run", 20)
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "FIFTYONE_DATABASE_URI": "",
        "FIFTYONE_DO_NOT_TRACK": "true",
        "FIFTYONE_DATABASE_VALIDATION": "false",
    }
    with mongod_server(tmp_path / "mongo") as uri:
        env["FIFTYONE_DATABASE_URI"] = uri
        cmd = [sys.executable, "-c", _EXPORT_AND_READ, str(run)]
        shown = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert shown.returncode == 0, shown.stderr[-3000:]
    in_view = json.loads(shown.stdout.strip().splitlines()[-1])
    assert json.loads((run / "fiftyone.json").read_text()) == {
        "dataset": "val", "view": "occlusion-review", "images": len(in_view)
    }  # fmt: skip
    index = write_report(run, tmp_path / "report")
    queue = [r["image_id"] for r in _rows(index.parent / "review.csv")]
    assert in_view == queue and len(queue) > 10  # the same images, in the same order
    page = index.read_text(encoding="utf-8")
    assert "the saved view <code>occlusion-review</code> of the dataset\n<code>val</code>" in page
