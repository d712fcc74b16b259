"""Strategy discovery over a group's maps: Spectral Relevance Analysis (SpRAy).

After Lapuschkin et al. 2019 ("Unmasking Clever Hans predictors"): the stored map grids of one
group (a class, by default) are normalised, embedded spectrally and clustered, and each
cluster's mean map shows one way the model decides. A small cluster whose maps all peak in one
fixed place is the signature of a watermark, border or tag shortcut, which needs no mask to be
seen. Where masks exist, a cluster whose ratio sits below 1 relies on what lies off the object.

Per group: each map (mean over channel positions) is divided by its absolute sum and
average-pooled to at most ``grid`` cells a side; a symmetric k-nearest-neighbour affinity
(``k = min(10, n - 1)``) gives a normalised graph Laplacian; the number of clusters is where its
smallest eigenvalues jump most (the eigengap, at most ``max_clusters``) unless fixed; k-means on
the spectral embedding assigns the clusters. scikit-learn and scipy do the linear algebra.
Groups are read a few at a time, so memory follows the largest group, not the run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from pipeline.audit.aggregate import iter_batches
from pipeline.audit.statistics import valid_ratios
from pipeline.run.folder import RunFolder

__all__ = ["CONCENTRATED", "FIXED_PLACE_SHARE", "discover", "spray_group", "strategy_group_columns"]

FIXED_PLACE_SHARE = 0.6  # of a cluster's maps peaking next to its mean map's peak
CONCENTRATED = 0.6  # share of the mean map's mass in its top 10% cells
_MAPS_PER_READ = 20_000  # maps held at once while reading groups


@dataclass(frozen=True)
class _Group:
    key: tuple[str | None, ...]
    ids: list[str]
    maps: np.ndarray  # (n, h, w) float64, normalised
    ratios: np.ndarray  # (n,) fg/bg ratio, NaN without a mask


def _pool(maps: np.ndarray, cells: int) -> np.ndarray:
    """Average-pool ``(n, h, w)`` maps to at most ``cells`` per side (whole blocks)."""
    n, h, w = maps.shape
    fy, fx = math.ceil(h / cells), math.ceil(w / cells)
    if fy == 1 and fx == 1:
        return maps
    ph, pw = math.ceil(h / fy) * fy, math.ceil(w / fx) * fx
    padded = np.zeros((n, ph, pw))
    padded[:, :h, :w] = maps
    return padded.reshape(n, ph // fy, fy, pw // fx, fx).mean(axis=(2, 4))


def _normalise(delta: np.ndarray) -> np.ndarray:
    total = np.abs(delta).sum(axis=(1, 2), keepdims=True)
    return np.divide(delta, total, out=np.zeros_like(delta), where=total > 0)


def spray_group(
    maps: np.ndarray, clusters: int | str = "auto", max_clusters: int = 8, seed: int = 0
) -> np.ndarray:
    """Cluster labels of one group's normalised maps.

    Args:
        maps: ``(n, h, w)`` normalised maps.
        clusters: a fixed number of clusters, or ``"auto"`` (the eigengap).
        max_clusters: the largest number the eigengap may choose.
        seed: k-means seed.

    Returns:
        ``(n,)`` int labels, 0 for the largest cluster, then by size.
    """
    from scipy.sparse.csgraph import laplacian

    try:
        from sklearn.cluster import KMeans
        from sklearn.neighbors import kneighbors_graph
    except ImportError as e:  # an optional extra
        raise RuntimeError(
            "strategy discovery needs scikit-learn: pip install 'occlusion-audit[discover]'"
        ) from e

    n = maps.shape[0]
    if n < 3:
        return np.zeros(n, dtype=int)
    x = maps.reshape(n, -1)
    k_nn = min(10, n - 1)
    graph = kneighbors_graph(x, k_nn, mode="connectivity", include_self=False)
    affinity = (0.5 * (graph + graph.T)).toarray()
    lap = laplacian(affinity, normed=True)
    values, vectors = np.linalg.eigh(lap)  # ascending
    if clusters == "auto":
        top = min(max_clusters, n - 1)
        gaps = np.diff(values[: top + 1])
        k = int(np.argmax(gaps)) + 1 if len(gaps) else 1
    else:
        k = max(1, min(int(clusters), n))
    if k == 1:
        return np.zeros(n, dtype=int)
    emb = vectors[:, :k]
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(emb)
    order = np.argsort(-np.bincount(labels, minlength=k), kind="stable")
    return np.argsort(order)[labels]


def strategy_group_columns(table: pd.DataFrame) -> list[str]:
    """The group columns of a ``strategies.parquet`` table: those before ``cluster``."""
    return list(table.columns[: list(table.columns).index("cluster")])


def _norm(key: tuple) -> tuple[str | None, ...]:
    """A group key as stored summaries spell it: text values, ``None`` for a missing one."""
    return tuple(None if pd.isna(v) else str(v) for v in key)


def _groups(run_dir: RunFolder, group_by: Sequence[str], cells: int) -> Iterator[_Group]:
    """The ``ok`` maps of each group, read a few groups at a time."""
    keys = pd.concat(
        [b.to_pandas() for b in iter_batches(run_dir, [*group_by, "status"])], ignore_index=True
    )
    keys = keys[keys["status"] == "ok"]
    counts = keys.groupby(list(group_by), dropna=False).size() if group_by else None
    chunks: list[list[tuple]] = [[]]
    held = 0
    for key, n in counts.items() if counts is not None else [((), len(keys))]:
        key = key if isinstance(key, tuple) else (key,)
        if held + n > _MAPS_PER_READ and chunks[-1]:
            chunks.append([])
            held = 0
        chunks[-1].append(key)
        held += n
    cols = [*group_by, "image_id", "status", "delta", "grid_c", "grid_h", "grid_w", "fg_bg_ratio"]
    for chunk in chunks:
        keys = {_norm(k) for k in chunk}
        wanted = None
        if group_by:
            first = [k[0] for k in chunk if k[0] is not None and k[0] == k[0]]
            wanted = pc.field(group_by[0]).isin(first) | pc.field(group_by[0]).is_null()
        df = pd.concat(
            [b.to_pandas() for b in iter_batches(run_dir, cols, filter=wanted)], ignore_index=True
        )
        df = df[df["status"] == "ok"]
        parts = df.groupby(list(group_by), dropna=False, sort=True) if group_by else [((), df)]
        for key, part in parts:
            key = _norm(key if isinstance(key, tuple) else (key,))
            if key not in keys:  # a null-valued group read along with this chunk's
                continue
            gc, gh, gw = (int(part[c].iloc[0]) for c in ("grid_c", "grid_h", "grid_w"))
            delta = np.stack(part["delta"].to_numpy()).astype(np.float64)
            delta = delta.reshape(len(part), gc, gh, gw).mean(axis=1)
            maps = _pool(_normalise(delta), cells)
            ratios = part["fg_bg_ratio"].to_numpy(dtype=np.float64)
            yield _Group(key, part["image_id"].tolist(), maps, ratios)


def _cluster_row(g: _Group, labels: np.ndarray, c: int, top: int) -> dict:
    idx = np.flatnonzero(labels == c)
    maps = g.maps[idx]
    mean = maps.mean(axis=0)
    flat = np.abs(mean).ravel()
    # a strategy's place: where the mean map's magnitude peaks (a map's sign follows the target)
    peak = np.unravel_index(int(np.argmax(np.abs(mean))), mean.shape)
    # the images nearest the cluster's mean map, the cluster's most typical members
    dist = np.linalg.norm((maps - mean).reshape(len(idx), -1), axis=1)
    nearest = [g.ids[i] for i in idx[np.argsort(dist, kind="stable")[:top]]]
    # fixed place: most members peak within one cell of the mean map's peak
    own = np.array([np.unravel_index(int(np.argmax(np.abs(m))), m.shape) for m in maps])
    near = (np.abs(own - np.array(peak)) <= 1).all(axis=1).mean()
    cells = max(1, math.ceil(0.1 * flat.size))
    concentration = float(np.sort(flat)[::-1][:cells].sum() / flat.sum()) if flat.sum() else 0.0
    r = g.ratios[idx]
    r = r[valid_ratios(r)]
    gmean = float(np.exp(np.log(r).mean())) if len(r) else math.nan
    return {
        "cluster": c,
        "n": len(idx),
        "share": len(idx) / len(labels),
        "mean_delta": mean.astype(np.float32).ravel().tolist(),
        "grid_h": mean.shape[0],
        "grid_w": mean.shape[1],
        "nearest_ids": nearest,
        "members": [g.ids[i] for i in idx],
        "peak_row": int(peak[0]),
        "peak_col": int(peak[1]),
        "concentration": concentration,
        # without masks: most maps peak in one place and the mean map is a sharp spot there
        "fixed_place": bool(
            near >= FIXED_PLACE_SHARE and concentration >= CONCENTRATED and len(r) == 0
        ),
        "gmean_ratio": gmean,
        "off_object": bool(math.isfinite(gmean) and gmean < 1.0),
    }


def discover(
    run_dir: str | os.PathLike[str],
    group_by: Sequence[str] | None = None,
    clusters: int | str = "auto",
    *,
    grid: int = 16,
    max_clusters: int = 8,
    seed: int = 0,
    top: int = 6,
    write: bool = True,
) -> pd.DataFrame:
    """Cluster each group's maps into strategies and write ``RUN_DIR/strategies.parquet``.

    Args:
        run_dir: the run folder.
        group_by: group columns (default ``label``, the class).
        clusters: ``"auto"`` (eigengap) or a fixed number per group.
        grid: maps are pooled to at most this many cells a side.
        max_clusters: the most clusters the eigengap may choose.
        seed: k-means seed; the same seed gives the same clusters.
        top: image ids stored per cluster, nearest to its mean map first.
        write: also write ``strategies.parquet`` (atomically).

    Returns:
        One row per (group, cluster): group columns, ``cluster``, ``n``, ``share``,
        ``mean_delta`` (row-major floats on ``grid_h x grid_w``), ``nearest_ids``, ``members``
        (every image id of the cluster), ``peak_row``,
        ``peak_col``, ``concentration`` (share of the mean map's mass in its top 10% cells),
        ``fixed_place``, ``gmean_ratio`` and ``off_object``; small, concentrated clusters first
        within each group.
    """
    group_by = tuple(group_by) if group_by is not None else ("label",)
    rows = []
    folder = RunFolder.of(run_dir)  # one listing for both passes and the write
    for g in _groups(folder, group_by, grid):
        labels = spray_group(g.maps, clusters, max_clusters, seed)
        for c in range(int(labels.max()) + 1 if len(labels) else 0):
            rows.append(
                {**dict(zip(group_by, g.key, strict=True)), **_cluster_row(g, labels, c, top)}
            )
    table = pd.DataFrame(rows)
    if len(table):
        table["_rank"] = -table["concentration"] + table["share"]
        table = table.sort_values([*group_by, "_rank"], kind="stable").drop(columns="_rank")
    if write:  # a local folder or a bucket: written whole either way
        folder.write_file("strategies.parquet", table.to_parquet(index=False))
    return table.reset_index(drop=True)
