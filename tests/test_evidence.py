"""Evidence beyond the ratio: swaps built exactly, Quantus's localisation metrics, and
counterfactual scores that do not depend on sharding or actors."""

from __future__ import annotations

import hashlib
import math
import warnings

import numpy as np
import pytest
import torch

from pipeline import load_config, read_maps, run_audit
from pipeline.config import AuditConfig
from pipeline.data.detect import open_source
from pipeline.data.plan import plan_source
from pipeline.kernel.counterfactual import NEUTRAL, background, composite, counterfactual_scores
from pipeline.kernel.localisation import LOCALISATION_METRICS, localisation_metrics
from pipeline.run.bank import BankPlanner
from pipeline.schema import COUNTERFACTUAL_METRICS
from tests._dataset import audit_config, image_set_with_model


def test_a_swap_takes_the_object_from_the_image_and_the_rest_from_the_bank_image():
    x = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3) / 20  # (C=2, H=3, W=3)
    m = torch.tensor([[0, 1, 0], [0, 1, 1], [0, 0, 0]], dtype=torch.bool)
    bank = torch.full((2, 3, 3), 0.9)
    bank_mask = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.bool)
    back = background(bank, bank_mask)  # its own object filled with its background's mean
    bank2 = bank.clone()
    bank2[:, 0, 0] = 0.1  # the bank image's object: it must not survive into its background
    back2 = background(bank2, bank_mask)
    assert torch.equal(back2, back)
    swapped = composite(x, m, back)
    for c in range(2):
        for i in range(3):
            for j in range(3):
                want = x[c, i, j] if m[i, j] else back[c, i, j]
                assert swapped[c, i, j] == want
    # the no-fg image is the image with its object filled by its own background's mean
    nofg = background(x, m)
    outside = x[:, ~m]  # (C, 6)
    assert torch.allclose(nofg[:, m], outside.mean(dim=1, keepdim=True).expand(2, 3))
    assert torch.equal(nofg[:, ~m], outside)


def test_scores_follow_a_model_that_reads_only_the_background():
    # the score is the mean of the pixels outside a fixed square: pure background reliance
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[2:6, 2:6] = True

    def scores(batch):
        return batch[:, :, ~inside].mean(dim=(1, 2))[:, None]

    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    backs = [[torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(k)) for k in (1, 2)]]
    target = torch.zeros(1, dtype=torch.long)
    res = counterfactual_scores(scores, x, inside[None], backs, [[]], target, classification=False)
    assert math.isclose(float(res.nofg_delta[0]), 0.0, abs_tol=1e-6)  # object removed: no change
    assert float(res.bg_reliance[0]) == pytest.approx(1.0)
    assert math.isnan(float(res.rand_delta[0])) and math.isnan(float(res.swap_flip[0]))
    only = composite(x[0], inside, torch.full_like(x[0], NEUTRAL))
    assert float(res.only_fg_delta[0]) == pytest.approx(
        float(scores(x)[0, 0] - scores(only[None])[0, 0])
    )


def _cases(n: int = 24):
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = int(rng.integers(4, 20)), int(rng.integers(4, 20))
        a = rng.normal(size=(h, w)).astype(np.float32)
        if i % 3 == 0:
            a = np.abs(a)  # all-positive maps too
        kind = i % 6
        s = np.zeros((h, w), bool) if kind == 0 else np.ones((h, w), bool) if kind == 1 else (
            rng.random((h, w)) < rng.uniform(0.05, 0.6)
        )  # fmt: skip
        yield a, s


def test_localisation_metrics_equal_quantus():
    quantus = pytest.importorskip("quantus")
    metrics = {
        "relevance_mass_accuracy": quantus.RelevanceMassAccuracy,
        "relevance_rank_accuracy": quantus.RelevanceRankAccuracy,
        "pointing_game": quantus.PointingGame,
        # our definition clips to positive attributions, Kohlbrenner et al.'s variant
        "attribution_localisation": lambda **kw: quantus.AttributionLocalisation(
            positive_attributions=True, **kw
        ),
    }
    checked = empty = full = 0
    for a, s in _cases():
        ours = localisation_metrics(torch.from_numpy(a), torch.from_numpy(s))
        x = np.zeros((1, 1, *a.shape), np.float32)
        for name, cls in metrics.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs = cls(abs=False, normalise=False, disable_warnings=True)(
                    model=None, x_batch=x, y_batch=np.zeros(1, int), a_batch=a[None, None],
                    s_batch=s[None, None].astype(np.float32), channel_first=True,
                )[0]  # fmt: skip
            if not s.any():  # empty mask: NaN for all four (Quantus casts NaN to a hit here)
                assert math.isnan(ours[name])
                continue
            if math.isnan(float(theirs)):
                assert math.isnan(ours[name]), (name, ours[name])
            else:
                # Quantus sums in float32, we in float64: equal to 1e-6 (relative for |x| > 1)
                assert ours[name] == pytest.approx(float(theirs), rel=1e-6, abs=1e-6), name
        checked += 1
        empty += not s.any()
        full += bool(s.all())
    assert checked >= 20 and empty >= 2 and full >= 2
    assert set(LOCALISATION_METRICS) == set(metrics)


def _bank_draws(cfg: AuditConfig, records):
    """Draws of every record, from banks planned by the driver's streaming pass; the banks are
    checked against their definition: per group, the ``bank`` images ranking first."""
    source = open_source(cfg.dataset)
    planner = BankPlanner(cfg)
    plan_source(source, 5, planner.add)
    banks = planner.finish(source)
    by_group: dict = {}
    for r in records:
        by_group.setdefault((r.groups["room"],), []).append(r.image_id)
    rank = {
        i: hashlib.sha256(f"{cfg.counterfactual.seed}\x00bank\x00{i}".encode()).digest()
        for ids in by_group.values()
        for i in ids
    }
    expected = {k: sorted(v, key=rank.get)[: cfg.counterfactual.bank] for k, v in by_group.items()}
    assert {k: [r.image_id for r in rs] for k, rs in banks.banks.items()} == expected
    return {r.image_id: banks.draw(r) for r in records}


def test_counterfactuals_do_not_depend_on_sharding_or_actors(local_ray, tmp_path):
    root = image_set_with_model(tmp_path / "data", n=14)
    cols = ["image_id", *COUNTERFACTUAL_METRICS, *LOCALISATION_METRICS, "swap_ids", "swap_scores"]
    got = []
    for name, cluster in (
        ("a", {"shard_size": 3, "actors": 1}),
        ("b", {"shard_size": 7, "actors": 2}),
    ):
        cfg = load_config(audit_config(root, tmp_path / name, cluster=cluster))
        assert run_audit(cfg, progress=False).exit_code == 0
        got.append(read_maps(tmp_path / name, columns=cols).sort_values("image_id"))
    a, b = got
    assert a["bg_reliance"].notna().all()
    for col in cols:
        left, right = a[col].tolist(), b[col].tolist()
        if col in ("swap_ids", "swap_scores"):
            assert [list(v) for v in left] == [list(v) for v in right], col
        else:
            np.testing.assert_array_equal(np.array(left), np.array(right), err_msg=col)
    # an image never gets its own background, and draws come from its own group
    from pipeline.data.manifest import read_manifest, records

    cfg = load_config(audit_config(root, tmp_path / "c"))
    recs = records(read_manifest(cfg.dataset), cfg.dataset)
    room = {r.image_id: r.groups["room"] for r in recs}
    for image_id, d in _bank_draws(cfg, recs).items():
        assert image_id not in d.same and {room[i] for i in d.same} == {room[image_id]}
        assert room[image_id] not in {room[i] for i in d.rand}
