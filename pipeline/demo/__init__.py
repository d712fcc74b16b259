"""Synthetic road-following demo: rooms with planted background shortcuts and a small model.

``prepare_demo(out_dir)`` writes training and audit data and trains ``SeedCNN``;
``DEMO_CONFIG`` is the audit config template whose paths are relative to that ``out_dir``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.demo.synth import DEFAULT_ROOMS, DEFAULT_SHORTCUT_ROOMS, generate_dataset
from pipeline.demo.train import DemoFiles, prepare_demo, train_demo_model

__all__ = [
    "DEFAULT_ROOMS",
    "DEFAULT_SHORTCUT_ROOMS",
    "DEMO_CONFIG",
    "DemoFiles",
    "generate_dataset",
    "prepare_demo",
    "train_demo_model",
]

#: Audit config template (DESIGN section 3); paths inside are relative to the demo folder.
DEMO_CONFIG = Path(__file__).with_name("demo.yaml")
