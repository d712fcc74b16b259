"""A validation set's worth of groups, built by hand: N classes of a few tiny images each.

Rows come from :func:`tests._runfixtures.make_row` (chosen metrics, shaped ``delta`` grids), with
the background-swap columns filled in and the class index as the ``label`` group; ``run.json``
carries the class names, and ``strategies.parquet`` one or two clusters per class, as
``discover`` writes them. Building 1,000 classes of 3 images takes a few seconds: no Ray, no
model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tests._runfixtures import GRID, make_row, write_images, write_run

_ADJECTIVES = (
    "red", "grey", "spotted", "striped", "little", "great", "common", "golden", "silver",
    "black", "white", "brown", "green", "blue", "crested", "horned", "long-tailed", "tufted",
    "pied", "wild", "pygmy", "royal", "marsh", "desert", "snow", "river", "sea", "rock",
    "forest", "mountain",
)  # fmt: skip
_NOUNS = (
    "fox", "owl", "heron", "lizard", "beetle", "moth", "frog", "toad", "finch", "wren", "hawk",
    "kestrel", "otter", "badger", "shrew", "vole", "marten", "newt", "salamander", "gecko",
    "snake", "turtle", "crab", "lobster", "shrimp", "eel", "trout", "perch", "pike", "carp",
    "goby", "ray", "shark", "whale", "seal", "walrus", "penguin", "puffin", "gull", "tern",
)  # fmt: skip


def class_names(n: int) -> dict[str, str]:
    """``{"0": "red fox", ...}``: ``n`` distinct made-up class names (past 1,200 numbered)."""
    pairs = [f"{a} {b}" for b in _NOUNS for a in _ADJECTIVES]
    order = np.random.default_rng(1).permutation(len(pairs))
    names = {}
    for i in range(n):
        lap, k = divmod(i, len(pairs))
        names[str(i)] = pairs[order[k]] + (f" {lap + 1}" if lap else "")
    return names


def _centre(rng: np.random.Generator, k: int) -> float:
    """A class's geometric-mean ratio: a third rely on background, a few sit near 1, the rest
    look at the object."""
    kind = k % 10
    if kind < 3:
        return float(rng.uniform(0.25, 0.6))
    if kind < 5:
        return float(rng.uniform(0.8, 1.2))
    return float(rng.uniform(1.8, 4.0))


def many_group_rows(
    n_groups: int, per_group: int = 3, *, seed: int = 0, change: Mapping[int, float] | None = None
) -> list[dict[str, Any]]:
    """``n_groups`` classes (``label`` "0".."n-1") of ``per_group`` images each.

    Args:
        n_groups: classes.
        per_group: images per class (ids ``c0007-0``...).
        seed: draws of the ratios and the swap evidence.
        change: class index -> factor applied to its ratios (a later run where some classes
            moved).

    Returns:
        Rows in ``maps_schema(["label"])`` form, classes interleaved as a manifest would be.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n_groups):
        centre = _centre(rng, k) * (change or {}).get(k, 1.0)
        ids = [f"c{k:04d}-{i}" for i in range(per_group)]
        for i, image_id in enumerate(ids):
            ratio = float(centre * math.exp(rng.normal(0.0, 0.12)))
            mask = f"masks/{image_id}.png" if i % 2 == 0 else "box:12,12,36,36"
            row = make_row(image_id, {}, ratio, mask=mask)
            reliant = ratio < 1.0
            swaps = [j for j in ids if j != image_id][:2]
            swap_delta = float(rng.uniform(0.8, 1.6) if reliant else rng.uniform(0.0, 0.3))
            nofg_delta = float(rng.uniform(0.2, 0.5) if reliant else rng.uniform(1.0, 2.0))
            row.update(
                label=str(k),
                swap_ids=swaps,
                swap_scores=[2.5 - swap_delta] * len(swaps),
                swap_delta=swap_delta,
                nofg_delta=nofg_delta,
                bg_reliance=abs(swap_delta) / (abs(swap_delta) + abs(nofg_delta)),
                swap_flip=float(0.5 if reliant and i == 0 else 0.0),
            )
            rows.append(row)
    order = np.random.default_rng(seed + 7).permutation(len(rows))
    return [rows[i] for i in order]


def strategies_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """``strategies.parquet`` as ``discover`` writes it: per class one cluster, and two for
    every fourth class (its lowest-ratio image apart)."""
    by_class: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_class.setdefault(r["label"], []).append(r)
    out = []
    for label in sorted(by_class, key=int):
        members = sorted(by_class[label], key=lambda r: r["fg_bg_ratio"])
        parts = [members[:1], members[1:]] if int(label) % 4 == 0 else [members]
        for c, part in enumerate(sorted(parts, key=len, reverse=True)):
            ratios = np.array([r["fg_bg_ratio"] for r in part])
            gmean = float(np.exp(np.log(ratios).mean()))
            mean = np.mean([np.asarray(r["delta"]) for r in part], axis=0)
            ids = [r["image_id"] for r in part]
            out.append(
                {
                    "label": label,
                    "cluster": c,
                    "n": len(part),
                    "share": len(part) / len(members),
                    "mean_delta": mean.astype(np.float32).tolist(),
                    "grid_h": GRID,
                    "grid_w": GRID,
                    "nearest_ids": ids,
                    "members": ids,
                    "peak_row": GRID // 2,
                    "peak_col": GRID // 2,
                    "concentration": 0.3,
                    "fixed_place": False,
                    "gmean_ratio": gmean,
                    "off_object": gmean < 1.0,
                }
            )
    return pd.DataFrame(out)


def write_many_groups(
    run_dir: Path,
    n_groups: int,
    per_group: int = 3,
    *,
    seed: int = 0,
    change: Mapping[int, float] | None = None,
    started_at: str = "2025-01-01T00:00:00+00:00",
    images: Path | None = None,
    bootstrap: int = 200,
) -> Path:
    """A finished run of ``n_groups`` classes with images, class names and strategies.

    Args:
        run_dir: the run folder to create.
        n_groups, per_group, seed, change: as :func:`many_group_rows`.
        started_at: the run's start (history orders runs by it).
        images: a folder whose ``images/`` and ``masks/`` the run reads (written when missing:
            several runs of one dataset share it); default ``run_dir / "data"``.
        bootstrap: ``audit.bootstrap`` (fewer resamples keep 1,000 groups quick).
    """
    rows = many_group_rows(n_groups, per_group, seed=seed, change=change)
    data = images or run_dir / "data"
    if not (data / "images").exists():
        write_images(data, sorted(r["image_id"] for r in rows))
    write_run(
        run_dir,
        rows,
        ["label"],
        parts=max(1, n_groups // 100),
        name=run_dir.name,
        audit={"min_images": per_group, "bootstrap": bootstrap},
        extra={
            "class_names": class_names(n_groups),
            "started_at": started_at,
            "status": "finished",
        },
    )
    info = json.loads((run_dir / "run.json").read_text())
    info["config"]["dataset"]["root"] = str(data)
    (run_dir / "run.json").write_text(json.dumps(info, indent=2))
    strategies_table(rows).to_parquet(run_dir / "strategies.parquet", index=False)
    return run_dir
