"""``occlusion-audit demo``: data, model, audit, report, in one command on a laptop."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from pipeline.demo import DEMO_CONFIG

__all__ = ["run_demo"]

# (training views per room, audited views per room, epochs) for the full and the quick demo
_SIZES = {False: (200, 40, 12), True: (120, 24, 10)}


def _prepared(out: Path, quick: bool) -> bool:
    """Whether ``out`` already holds data and a model made with these sizes."""
    stamp = out / "demo.json"
    needed = [out / "data" / "audit" / "manifest.parquet", out / "model" / "seed_cnn_demo.pt"]
    if not stamp.exists() or not all(p.exists() for p in needed):
        return False
    return json.loads(stamp.read_text()).get("sizes") == list(_SIZES[quick])


def run_demo(out_dir: str | Path = "demo-data", *, quick: bool = False) -> int:
    """Build the demo data and model if missing, audit it on an embedded Ray, write the report.

    Args:
        out_dir: folder for data, model, run and report (reused on the next call).
        quick: smaller data and shorter training (the same planted rooms).

    Returns:
        The audit's exit code (0 when every image was processed).
    """
    from pipeline.audit.aggregate import aggregate
    from pipeline.config.load import load_config
    from pipeline.demo.train import prepare_demo
    from pipeline.report.build import write_report
    from pipeline.run.runner import run_audit

    t0 = time.perf_counter()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    n_train, n_audit, epochs = _SIZES[quick]
    if _prepared(out, quick):
        print(f"demo: reusing data and model in {out}")
    else:
        print(f"demo: generating views and training SeedCNN in {out} ...")
        threads = torch.get_num_threads()
        prepare_demo(out, n_train_per_room=n_train, n_audit_per_room=n_audit, epochs=epochs)
        torch.set_num_threads(threads)
        (out / "demo.json").write_text(json.dumps({"sizes": [n_train, n_audit, epochs]}))
    config_path = out / "demo.yaml"
    shutil.copyfile(DEMO_CONFIG, config_path)
    cfg = load_config(config_path)
    run_dir = Path(cfg.output.dir or out / "runs" / cfg.name)
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo's own folder: start afresh each time
    result = run_audit(cfg)
    summary = aggregate(result.run_dir)
    report = write_report(result.run_dir)
    flagged = summary.loc[summary["status"] == "flagged", "room"].tolist()
    print()
    for _, row in summary.iterrows():
        swaps = f"bg_reliance {row['bg_reliance']:.2f}" + (" confirmed" if row["confirmed"] else "")
        print(
            f"  {row['room']:<12} {row['status']:<8} fg/bg ratio {row['gmean_ratio']:.2f} "
            f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}] over {row['n_valid']} views, {swaps}"
        )
    print(f"\ndemo: flagged rooms (the model steers by the background there): {flagged}")
    print(f"demo: {result.ok}/{result.images} views audited in {time.perf_counter() - t0:.0f}s")
    print(f"demo: report {report}")
    return result.exit_code
