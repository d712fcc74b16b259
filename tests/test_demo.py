"""The reduced demo end to end: exactly the planted shortcut rooms are flagged."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipeline.demo import DEFAULT_SHORTCUT_ROOMS
from tests._browser import chromium, probe_page, screenshot


@pytest.fixture(scope="module")
def demo_dir(quick_demo: Path) -> Path:
    return quick_demo


@pytest.mark.slow
def test_exactly_the_planted_rooms_are_flagged(demo_dir: Path) -> None:
    summary = pd.read_csv(demo_dir / "report" / "summary.csv")
    flagged = set(summary.loc[summary["status"] == "flagged", "room"])
    assert flagged == set(DEFAULT_SHORTCUT_ROOMS)
    assert set(summary.loc[summary["status"] != "flagged", "status"]) == {"ok"}
    maps = pd.read_parquet(demo_dir / "runs" / "demo" / "maps")
    assert len(maps) == 6 * 24 and maps["status"].eq("ok").all()


@pytest.mark.slow
def test_background_swaps_confirm_exactly_the_planted_rooms(demo_dir: Path) -> None:
    s = pd.read_parquet(demo_dir / "runs" / "demo" / "summary.parquet").set_index("room")
    planted = s.loc[list(DEFAULT_SHORTCUT_ROOMS)]
    clean = s.drop(index=list(DEFAULT_SHORTCUT_ROOMS))
    assert planted["confirmed"].all() and (planted["bg_reliance_low"] > 0.5).all()
    assert not clean["confirmed"].any()
    assert clean["bg_reliance"].max() < planted["bg_reliance"].min()
    # the object explains the clean rooms' scores, the lamp the planted rooms'
    assert (
        clean["mean_relevance_mass_accuracy"] > planted["mean_relevance_mass_accuracy"].max()
    ).all()


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(chromium() is None, reason="chromium is not installed")
def test_the_demo_report_shows_the_flagged_rooms_with_galleries(
    demo_dir: Path, tmp_path: Path
) -> None:
    page = demo_dir / "report" / "index.html"
    attrs, dom = probe_page(page, tmp_path)
    assert attrs["data-problems"] == "[]" and attrs["data-broken"] == "[]"
    for room in DEFAULT_SHORTCUT_ROOMS:
        assert f"Room {room}: the model relies on background" in dom
    assert dom.count('data-confirmed="yes"') == len(DEFAULT_SHORTCUT_ROOMS)
    assert "background: score" in dom  # example swaps with the score change
    assert int(attrs["data-images"]) >= 2 + 2 * 6  # charts + a gallery per flagged room
    assert screenshot(page, tmp_path / "demo.png", tmp_path).stat().st_size > 10_000
