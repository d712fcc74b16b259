"""`occlusion-audit bench` end to end on a tiny model: every engine timed, maps equal Captum's."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from pipeline.bench.approximate import add_approx_argument
from pipeline.bench.engines import bench_checks, bench_threshold
from pipeline.bench.nets import BENCH_MODELS, build_bench_model
from pipeline.cli import main
from pipeline.kernel import defaults
from pipeline.run.pool import worker_threads_here


def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", "seed-cnn-gap", "--image-size", "32", "--window", "8"]
    argv += [
        "--stride",
        "4",
        "--n-baselines",
        "2",
        "--images",
        "2",
        "--repeats",
        "1",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    facts = json.loads(out.read_text())
    rows = {r["engine"]: r for r in facts["rows"]}
    # SeedCNNWithGAP's trunk is local: a run would pick the incremental engine, so it is "ours"
    assert facts["incremental"] == "ok" and facts["ours"] == "incremental"
    expected = {"generic", "incremental", "captum", "captum-best", "roofline", "cf-swaps"}
    assert set(rows) == expected | {"approximate", "approx-unchecked"}
    assert facts["machine"]["heap_tuned"] is True  # glibc: as a run's CPU workers
    for r in rows.values():
        assert r["median_seconds"] > 0 and r["images_per_s"] > 0 and r["peak_bytes"] > 0
        assert all(s > 0 for s in r["seconds"])
    for name in expected - {"roofline", "cf-swaps"}:
        assert rows[name]["max_abs_diff"] <= 1e-5, name
    assert rows["roofline"]["max_abs_diff"] is None and rows["cf-swaps"]["max_abs_diff"] is None
    # approximate maps are not held to the tolerance; the row reports its measured error
    approx, bare = rows["approximate"], rows["approx-unchecked"]
    assert approx["approx_threshold"] == 0.4 and approx["windows"] == 49
    assert approx["approx_check_windows"] == defaults.APPROX_CHECK_WINDOWS < 49
    assert approx["largest_error"] > 1e-6  # thresholding changes these maps
    # a sample of the windows: at most the largest error over all of them
    assert 0 < approx["approx_error"] <= approx["largest_error"]
    # a full-resolution map is a mean over draws and windows of score drops, so it differs from
    # the exact (Captum's) map by at most the largest error of one window, plus the tolerance
    assert approx["max_abs_diff"] <= approx["largest_error"] + facts["tolerance"]
    # without the check windows: the same maps, no error, and the check's cost side by side
    assert bare["max_abs_diff"] == approx["max_abs_diff"] and "approx_error" not in bare
    ratio = bare["median_seconds"] / approx["median_seconds"]
    assert facts["ratios"]["approximate/approx-unchecked"] == pytest.approx(ratio)
    assert approx["recomputed_elements"] <= approx["exact_recomputed_elements"]
    assert approx["conv_macs"] < approx["full_pass_conv_macs"]
    assert 0 < facts["counterfactual_seconds_per_image"] == rows["cf-swaps"]["median_seconds"] / 2
    # 2 images x 2 draws x 7x7 windows + the 2 unoccluded passes
    assert facts["work"]["forward_passes"] == 2 * 2 * 49 + 2
    assert facts["ok"]
    for name in ("ours", "generic", "incremental", "approximate"):
        for ref in ("captum-best", "roofline"):
            assert facts["ratios"][f"{name}/{ref}"] > 0
    ratio = rows["roofline"]["median_seconds"] / rows["generic"]["median_seconds"]
    assert facts["ratios"]["generic/roofline"] == pytest.approx(ratio)
    assert facts["stored_bytes_per_image"] > 2 * 49 * 4  # at least the float32 deltas
    assert facts["machine"]["torch"] == torch.__version__
    # every row ran with a worker's torch threads on this machine; the caller's are restored
    worker = worker_threads_here(gpus=False)
    assert facts["machine"]["torch_threads"] == worker
    assert torch.get_num_threads() == 1  # tests/conftest.py
    text = capsys.readouterr().out
    assert "captum-best" in text and "roofline" in text and "incremental" in text
    assert "ours (occlusion.engine auto: incremental)" in text
    assert "approximate (tau=0.4)" in text and "measured error" in text
    assert "29 check windows of 49 cost" in text and "90th percentile" in text


def _one_window_bench(tmp_path, model: str, *extra: str) -> dict:
    """The bench on one 32x32 image with a single 16 px window grid, K=1; its JSON facts."""
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", model, "--image-size", "32", "--window", "16", "--n-baselines", "1"]
    argv += ["--stride", "16", "--images", "1", "--repeats", "1", "--json", str(out), *extra]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_bench_engine_generic_times_the_generic_kernel_as_ours(tmp_path, capsys):
    facts = _one_window_bench(tmp_path, "vgg-small", "--engine", "generic", "--default-malloc")
    assert facts["machine"]["heap_tuned"] is False
    assert facts["ours"] == "generic" and facts["incremental"] == "--engine generic"
    engines = {r["engine"] for r in facts["rows"]}
    assert engines == {"generic", "captum", "captum-best", "roofline", "cf-swaps"}
    assert facts["ratios"]["ours/roofline"] == facts["ratios"]["generic/roofline"]
    assert "incremental: n/a (--engine generic)" in capsys.readouterr().out


def test_bench_no_captum_checks_incremental_maps_against_generic(tmp_path, capsys):
    facts = _one_window_bench(tmp_path, "resnet50", "--no-captum", "--max-batch", "4")
    rows = {r["engine"]: r for r in facts["rows"]}
    kinds = {"generic", "incremental", "approximate", "approx-unchecked", "roofline", "cf-swaps"}
    assert set(rows) == kinds
    assert rows["generic"]["max_abs_diff"] == 0.0  # the reference itself
    assert rows["incremental"]["max_abs_diff"] <= facts["tolerance"]
    # 4 windows, fewer than the check windows: every one is checked, so the measured error is
    # the largest; each pixel lies in one window (stride = window), K = 1, so the full maps
    # differ from the generic kernel's by exactly that error, within the tolerance
    approx = rows["approximate"]
    assert approx["windows"] == 4 < approx["approx_check_windows"]
    assert approx["approx_error"] == approx["largest_error"]
    assert abs(approx["approx_error"] - approx["max_abs_diff"]) <= facts["tolerance"]
    assert not any("captum" in k for k in facts["ratios"])
    assert facts["ratios"]["incremental/roofline"] > 0
    assert "maps vs the generic kernel's" in capsys.readouterr().out


def test_bench_compile_times_the_compiled_generic_kernel(tmp_path, capsys):
    facts = _one_window_bench(tmp_path, "seed-cnn-gap", "--compile", "--no-captum")
    rows = {r["engine"]: r for r in facts["rows"]}
    kinds = {"generic", "compiled", "incremental", "approximate", "approx-unchecked"}
    kinds |= {"roofline", "cf-swaps"}
    assert set(rows) == kinds
    # the worker's settings with occlusion.compile: true, and the eager maps
    assert rows["compiled"]["setting"].endswith(",fixed,compile")
    assert rows["compiled"]["max_abs_diff"] <= facts["tolerance"]
    gain = rows["generic"]["median_seconds"] / rows["compiled"]["median_seconds"]
    assert facts["ratios"]["compiled/generic"] == pytest.approx(gain)
    assert "compile: " in capsys.readouterr().out


def test_approx_threshold_flag():
    parser = argparse.ArgumentParser()
    add_approx_argument(parser)
    assert parser.parse_args([]).approx_threshold == 0.4
    args = parser.parse_args(["--approx-threshold", "0.6"])
    assert args.approx_threshold == 0.6 and bench_threshold(args) == 0.6
    assert bench_threshold(argparse.Namespace()) == 0.4  # a namespace without the flag
    assert parser.parse_args([]).approx_check_windows == defaults.APPROX_CHECK_WINDOWS
    args = parser.parse_args(["--approx-check-windows", "59"])
    assert bench_checks(args) == 59
    assert bench_checks(argparse.Namespace()) == defaults.APPROX_CHECK_WINDOWS


@pytest.mark.parametrize("name", sorted(BENCH_MODELS))
def test_bench_models_build(name):
    model = build_bench_model(name, 32, num_classes=4)
    with torch.inference_mode():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    assert not model.training


def test_resnet50_size():
    params = sum(p.numel() for p in BENCH_MODELS["resnet50"](224, 1000).parameters())
    assert 25.0e6 < params < 26.0e6  # ResNet-50: 25.56M with a 1000-class head


def test_unknown_model_is_an_error(capsys):
    assert main(["bench", "--model", "nope", "--images", "1", "--repeats", "1"]) == 2
    assert "seed-cnn" in capsys.readouterr().err


def test_bench_end_to_end_times_a_real_run_the_kernel_and_a_captum_script(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    argv = ["bench", "--end-to-end", "8", "--image-size", "32", "--window", "8", "--stride", "8"]
    assert main([*argv, "--n-baselines", "1", "--rounds", "2", "--json", str(out)]) == 0
    facts = json.loads(out.read_text())
    assert set(facts["rows"]) == {"run", "kernel", "captum-script"}
    assert facts["rows"]["run"]["ok"] == 8
    for name, row in facts["rows"].items():
        assert len(row["rounds"]) == 2 and row["images_per_s"] > 0, name
        assert row["images_per_s"] == pytest.approx(sum(row["rounds"]) / 2), name  # median of 2
    phases = facts["rows"]["run"]["phases_s"]
    assert phases["kernel_s"] > 0 and {"read_decode_s", "write_s", "metrics_s"} <= set(phases)
    run, kernel = facts["rows"]["run"]["images_per_s"], facts["rows"]["kernel"]["images_per_s"]
    assert facts["ratios"]["run/kernel"] == pytest.approx(run / kernel)
    assert set(facts["ratios"]) == {"run/kernel", "run/captum-script"}
    assert "run/captum-script" in capsys.readouterr().out


@pytest.mark.parametrize(
    "model", ["timm:resnet10t", "torchvision:resnet18", "transformers", "export"]
)
def test_bench_times_a_library_architecture_with_random_weights(model, tmp_path, capsys):
    from tests._zoo import export_pt2, hf_folder

    if model == "transformers":  # a folder with the architecture's config.json
        model = f"transformers:{hf_folder('convnext', tmp_path / 'hf')}"
    if model == "export":  # an archive as it is: its own weights, its aten ops lowered
        model = f"export:{export_pt2(tmp_path / 'm.pt2', side=32)}"
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", model, "--image-size", "32", "--window", "16", "--stride", "16"]
    argv += [
        "--n-baselines",
        "1",
        "--images",
        "1",
        "--repeats",
        "1",
        "--no-captum",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    facts = json.loads(out.read_text())
    # the engine a run would pick: ResNet and ConvNeXt trunks are local (a transformers ConvNeXt
    # traces with the input's shape known, an archive's aten ops are lowered to torch ops)
    assert facts["ours"] == "incremental" and facts["ok"]
    assert f"bench {model} 32px" in capsys.readouterr().out


def test_bench_model_names_and_kwargs_are_checked():
    with pytest.raises(ValueError, match=r"torchvision:NAME, transformers:PATH, export:FILE"):
        build_bench_model("resnet18", 32)
    with pytest.raises(ValueError, match=r"applies to LIBRARY:NAME models"):
        build_bench_model("seed-cnn", 32, kwargs={"img_size": 32})
    vit = build_bench_model("timm:vit_tiny_patch16_224", 32, kwargs={"img_size": 32, "depth": 1})
    assert vit(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_bench_mode_token_drop_times_it_against_fill_on_a_vit(tmp_path, capsys):
    out = tmp_path / "bench.json"
    vit = '{"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}'
    argv = ["bench", "--mode", "token-drop", "--model", "timm:vit_tiny_patch16_224"]
    argv += ["--model-kwargs", vit, "--image-size", "32", "--window", "16", "--stride", "8"]
    argv += ["--images", "2", "--repeats", "1", "--json", str(out)]
    assert main(argv) == 0
    facts = json.loads(out.read_text())
    # 9 windows: fill draws K=3 of each, token-drop one; plus the unoccluded pass
    assert facts["passes_per_image"] == {"fill": 28, "token-drop": 10}
    assert [r["engine"] for r in facts["rows"]] == ["fill", "token-drop"]
    assert facts["token-drop/fill speed"] > 0 and -1 <= facts["map_correlation"] <= 1
    assert "token-drop: " in capsys.readouterr().out
    # a model it does not fit, or an end-to-end run, is a usage error in one line
    assert main(["bench", "--mode", "token-drop", "--model", "seed-cnn", "--image-size", "32"]) == 2
    assert "the model is a SeedCNN" in capsys.readouterr().err
    assert main(["bench", "--mode", "token-drop", "--end-to-end", "4"]) == 2
    assert "leave out --end-to-end" in capsys.readouterr().err
