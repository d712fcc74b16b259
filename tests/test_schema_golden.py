"""The stored Parquet schemas, pinned column by column: a renamed, dropped, reordered or retyped
column breaks every reader downstream (DuckDB queries, dashboards, last night's runs), so a change
here must be deliberate. The lists are written out, not built from the writer's constants."""

from __future__ import annotations

import math

import pyarrow as pa
import torch

from pipeline.kernel import localisation
from pipeline.schema import LOCALISATION_METRICS, maps_schema, summary_schema

F32, F64, I32, I64, S = pa.float32(), pa.float64(), pa.int32(), pa.int64(), pa.string()

MAPS = [
    ("image_id", S, False),
    ("room", S, True),  # the group column, after image_id
    ("path", S, True),
    ("mask", S, True),
    ("label", S, True),
    ("target", I64, True),
    ("score", F32, True),
    ("status", S, False),
    ("error", S, True),
    ("image_h", I32, True),
    ("image_w", I32, True),
    ("image_c", I32, True),
    ("mode", S, True),
    ("window", pa.list_(I32), True),
    ("stride", pa.list_(I32), True),
    ("grid_c", I32, True),
    ("grid_h", I32, True),
    ("grid_w", I32, True),
    ("delta", pa.list_(F32), True),
    ("delta_std", pa.list_(F32), True),
    ("approx_error", F32, True),
    ("fg_share", F64, True),
    ("fg_area", F64, True),
    ("fg_bg_ratio", F64, True),
    ("fg_share_pos", F64, True),
    ("fg_bg_ratio_pos", F64, True),
    ("metric_note", S, True),
    ("relevance_mass_accuracy", F64, True),
    ("relevance_rank_accuracy", F64, True),
    ("pointing_game", F64, True),
    ("attribution_localisation", F64, True),
    ("swap_delta", F64, True),
    ("nofg_delta", F64, True),
    ("rand_delta", F64, True),
    ("only_fg_delta", F64, True),
    ("swap_flip", F64, True),
    ("bg_reliance", F64, True),
    ("acc_original", F64, True),
    ("acc_mixed_same", F64, True),
    ("acc_mixed_rand", F64, True),
    ("acc_only_fg", F64, True),
    ("swap_ids", pa.list_(S), True),
    ("swap_scores", pa.list_(F32), True),
    ("cf_note", S, True),
    ("shard", I32, False),
]

SUMMARY = [
    "room",
    "n", "n_valid", "n_error", "n_nan",
    "gmean_ratio", "ci_low", "ci_high", "median_ratio", "share_below_1",
    "mean_fg_share", "mean_fg_area",
    "gmean_ratio_pos", "ci_low_pos", "ci_high_pos", "median_ratio_pos", "share_below_1_pos",
    "mean_fg_share_pos",
    "bg_reliance", "bg_reliance_low", "bg_reliance_high", "swap_flip_rate",
    "acc_original", "acc_mixed_same", "acc_mixed_rand", "acc_only_fg", "bg_gap",
    "mean_relevance_mass_accuracy", "mean_relevance_rank_accuracy", "mean_pointing_game",
    "mean_attribution_localisation",
    "confirmed", "p_value", "q_value", "status",
]  # fmt: skip


def test_the_maps_schema_column_by_column() -> None:
    got = [(f.name, f.type, f.nullable) for f in maps_schema(["room"])]
    assert got == MAPS


def test_the_summary_schema_column_by_column() -> None:
    schema = summary_schema(["room"])
    assert schema.names == SUMMARY
    counts = {"n", "n_valid", "n_error", "n_nan"}
    for f in schema:
        want = (
            S if f.name in ("room", "status")
            else pa.bool_() if f.name == "confirmed"
            else I64 if f.name in counts
            else F64
        )  # fmt: skip
        assert f.type == want, f.name
        assert f.nullable == (f.name not in counts | {"status"}), f.name


def test_the_stored_localisation_metrics_are_those_the_kernel_computes() -> None:
    assert localisation.LOCALISATION_METRICS == LOCALISATION_METRICS
    attribution = torch.rand(8, 8)  # (H, W)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:5, 2:5] = True
    values = localisation.localisation_metrics(attribution, mask)
    assert tuple(values) == LOCALISATION_METRICS
    assert all(0.0 <= v <= 1.0 for v in values.values() if not math.isnan(v))
