"""Parquet schemas of stored results, declared once; readers and writers use these constants.

``RUN_DIR/maps/part-NNNNN.parquet`` holds one row per manifest image (``MAPS_SCHEMA`` plus the
run's group columns, inserted after ``image_id``); ``RUN_DIR/summary.parquet`` one row per group
(``SUMMARY_SCHEMA`` plus the group columns first).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

__all__ = [
    "COUNTERFACTUAL_METRICS",
    "FLOAT_METRICS",
    "IMAGE_METRICS",
    "LOCALISATION_METRICS",
    "MAPS_SCHEMA",
    "STATUS_ERROR",
    "STATUS_OK",
    "SUMMARY_SCHEMA",
    "maps_schema",
    "summary_schema",
]

STATUS_OK = "ok"
STATUS_ERROR = "error"

#: Per-image metrics (docs/design.md, "Metrics"). ``_pos`` variants use I+ = max(map, 0); the
#: foreground area does not depend on the map, so it has no ``_pos`` twin.
IMAGE_METRICS: tuple[str, ...] = (
    "fg_share",
    "fg_area",
    "fg_bg_ratio",
    "fg_share_pos",
    "fg_bg_ratio_pos",
)

#: Localisation metrics of the map against the mask, named as in Quantus (docs/design.md,
#: "Metrics"); the same names as ``pipeline.kernel.localisation.LOCALISATION_METRICS``.
LOCALISATION_METRICS: tuple[str, ...] = (
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "pointing_game",
    "attribution_localisation",
)
#: Counterfactual background evidence per image (docs/design.md, "Counterfactuals").
COUNTERFACTUAL_METRICS: tuple[str, ...] = (
    "swap_delta",  # score(x) - mean score on same-group backgrounds
    "nofg_delta",  # score(x) - score without the foreground
    "rand_delta",  # score(x) - mean score on other groups' backgrounds
    "only_fg_delta",  # score(x) - score of the foreground on grey
    "swap_flip",  # share of same-group swaps that change the predicted class
    "bg_reliance",  # |swap_delta| / (|swap_delta| + |nofg_delta|), in [0, 1]
    "acc_original",  # with an integer label: prediction correct (1/0), else NaN
    "acc_mixed_same",  # share of same-group swaps predicted correctly
    "acc_mixed_rand",  # share of other-group swaps predicted correctly
    "acc_only_fg",  # the foreground on grey predicted correctly
)
#: Every per-image float column, stored NaN (never null) where undefined.
FLOAT_METRICS: tuple[str, ...] = (*IMAGE_METRICS, *LOCALISATION_METRICS, *COUNTERFACTUAL_METRICS)

MAPS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("path", pa.string()),  # image path as given in the manifest
        pa.field("mask", pa.string()),  # where the foreground came from (docs/design.md)
        pa.field("label", pa.string()),  # manifest label as text (class index, value or name)
        pa.field("target", pa.int64()),  # output index explained by this map
        pa.field("score", pa.float32()),  # unoccluded score of the target (logit/prob/value)
        pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
        pa.field("error", pa.string()),  # what went wrong, naming the item; null when ok
        pa.field("image_h", pa.int32()),  # pixels, after resize
        pa.field("image_w", pa.int32()),
        pa.field("image_c", pa.int32()),
        # what occluding a window meant: "fill" (a baseline) or "token-drop" (a ViT's patch
        # tokens under it removed)
        pa.field("mode", pa.string()),
        pa.field("window", pa.list_(pa.int32())),  # [c, h, w]
        pa.field("stride", pa.list_(pa.int32())),  # [c, h, w]
        pa.field("grid_c", pa.int32()),  # window positions per axis
        pa.field("grid_h", pa.int32()),
        pa.field("grid_w", pa.int32()),
        # score drop per window position, mean over the K baselines, row-major (c, h, w)
        pa.field("delta", pa.list_(pa.float32())),
        pa.field("delta_std", pa.list_(pa.float32())),  # population std over the K draws
        # engine approximate: the largest |approximate - exact| score drop over the image's
        # approx_check_windows n check windows, drawn uniformly (seed, image id): at least the
        # q-quantile of the image's window errors with probability 1 - q^n (n = 29: the 90th
        # percentile with 95% confidence; all windows when n >= their number); null for exact
        # engines
        pa.field("approx_error", pa.float32()),
        *(pa.field(m, pa.float64()) for m in IMAGE_METRICS),
        pa.field("metric_note", pa.string()),  # why a metric is NaN, else null
        *(pa.field(m, pa.float64()) for m in LOCALISATION_METRICS),
        *(pa.field(m, pa.float64()) for m in COUNTERFACTUAL_METRICS),
        pa.field("swap_ids", pa.list_(pa.string())),  # the same-group bank images pasted behind
        pa.field("swap_scores", pa.list_(pa.float32())),  # the score on each of those swaps
        pa.field("cf_note", pa.string()),  # why the counterfactual columns are NaN, else null
        pa.field("shard", pa.int32(), nullable=False),
    ]
)

_RATIO_STATS: tuple[tuple[str, pa.DataType], ...] = (
    ("gmean_ratio", pa.float64()),  # geometric mean of fg_bg_ratio
    ("ci_low", pa.float64()),  # bootstrap interval of the geometric mean
    ("ci_high", pa.float64()),
    ("median_ratio", pa.float64()),
    ("share_below_1", pa.float64()),  # share of valid images with ratio < 1
)

# per group: counterfactual evidence and localisation means (docs/design.md, "Counterfactuals")
_EVIDENCE_STATS: tuple[str, ...] = (
    "bg_reliance",
    "bg_reliance_low",
    "bg_reliance_high",
    "swap_flip_rate",
    "acc_original",
    "acc_mixed_same",
    "acc_mixed_rand",
    "acc_only_fg",
    "bg_gap",
    *(f"mean_{m}" for m in LOCALISATION_METRICS),
)

SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("n", pa.int64(), nullable=False),  # rows in the group
        pa.field("n_valid", pa.int64(), nullable=False),  # ok rows with a finite positive ratio
        pa.field("n_error", pa.int64(), nullable=False),  # rows with status "error"
        pa.field("n_nan", pa.int64(), nullable=False),  # ok rows whose ratio is NaN/inf/0
        *(pa.field(name, t) for name, t in _RATIO_STATS),
        pa.field("mean_fg_share", pa.float64()),
        pa.field("mean_fg_area", pa.float64()),
        *(pa.field(f"{name}_pos", t) for name, t in _RATIO_STATS),
        pa.field("mean_fg_share_pos", pa.float64()),
        *(pa.field(name, pa.float64()) for name in _EVIDENCE_STATS),
        pa.field("confirmed", pa.bool_()),  # flagged and bg_reliance_low > 0.5
        pa.field("p_value", pa.float64()),  # one-sided: geometric-mean ratio < threshold
        pa.field("q_value", pa.float64()),  # Benjamini-Hochberg across the audit's groups
        # flagged | inconclusive | ok | too-few | unreliable
        pa.field("status", pa.string(), nullable=False),
    ]
)


def _group_fields(group_by: Sequence[str]) -> list[pa.Field]:
    return [pa.field(g, pa.string()) for g in group_by]


LABEL_GROUP = "label"  # grouping by the manifest label: the stored ``label`` column itself


def maps_schema(group_by: Sequence[str]) -> pa.Schema:
    """``MAPS_SCHEMA`` with the group columns (as strings) inserted after ``image_id``.

    A group named ``label`` is not added: it is the stored ``label`` column (the manifest label
    as text), so ``group_by: [label]`` groups by class.
    """
    clash = set(group_by) & set(MAPS_SCHEMA.names) - {LABEL_GROUP}
    if clash:
        raise ValueError(f"group column(s) {sorted(clash)} clash with stored column names")
    fields = list(MAPS_SCHEMA)
    extra = [g for g in group_by if g != LABEL_GROUP]
    return pa.schema([fields[0], *_group_fields(extra), *fields[1:]])


def summary_schema(group_by: Sequence[str]) -> pa.Schema:
    """``SUMMARY_SCHEMA`` with the group columns (as strings) first."""
    return pa.schema([*_group_fields(group_by), *SUMMARY_SCHEMA])
