"""A run and the Python API with the same settings compute the same maps, bit for bit.

The run goes through a real local Ray (actors, shards, Parquet); the API call gets the same
decoded images, the config's ``attribute`` keywords and the options a worker builds with
:func:`pipeline.run.settings.worker_compute`. Every baseline kind is covered, blur included,
whose default once differed between the config and the API.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import attribute, load_config, read_maps, run_audit
from pipeline.data.images import load_image
from pipeline.models import load_model
from pipeline.run.settings import kernel_keywords, worker_compute
from tests._dataset import audit_config, image_set_with_model

BASELINES = ["random-pixel", "random-channel", "mean", "zero", "constant", "blur", "noise"]


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    return image_set_with_model(tmp_path_factory.mktemp("data"), n=6)


@pytest.mark.parametrize("baseline", BASELINES)
def test_run_maps_equal_the_api_maps(local_ray, image_set, tmp_path, baseline):
    occlusion = {"window": [8, 8], "stride": [4, 4], "baseline": baseline, "max_batch": 32}
    if baseline in ("mean", "zero", "constant", "blur"):
        occlusion["n_baselines"] = 1
    else:
        occlusion["n_baselines"] = 2
    if baseline == "constant":
        occlusion["value"] = [0.2, 0.5, 0.8]
    cfg = load_config(
        audit_config(image_set, tmp_path / "run", occlusion=occlusion, cluster={"shard_size": 4})
    )
    assert run_audit(cfg, progress=False).exit_code == 0
    maps = read_maps(cfg.output.dir).sort_values("image_id")
    ids = list(maps["image_id"])

    images = torch.stack(
        [load_image(f"images/{i}.png", str(image_set), (24, 24), image_id=i)[0] for i in ids]
    )
    model = load_model(cfg.model, cfg.dataset.normalize, "cpu")
    wc = worker_compute(cfg.occlusion, model, (3, 24, 24), torch.device("cpu"))
    api = attribute(model, images, image_ids=ids, options=wc.options, **kernel_keywords(cfg))
    stored = np.stack(maps["delta"].to_list())
    np.testing.assert_array_equal(stored, api.delta[:, 0].flatten(1).numpy())
    stored_std = np.stack(maps["delta_std"].to_list())
    np.testing.assert_array_equal(stored_std, api.delta_std[:, 0].flatten(1).numpy())
    # the settings the config leaves at their defaults need not be passed: the API's defaults
    # are the config's (blur_sigma, seed, value, stride, ...)
    given = {"window": (8, 8), "baseline": baseline, "n_baselines": occlusion["n_baselines"]}
    if baseline == "constant":
        given["value"] = occlusion["value"]
    bare = attribute(model, images, image_ids=ids, options=wc.options, **given)
    np.testing.assert_array_equal(stored, bare.delta[:, 0].flatten(1).numpy())
