"""Synthetic road-following demo: rooms with planted background shortcuts and a small model.

``prepare_demo(out_dir)`` writes training and audit data and trains ``SeedCNN``;
``DEMO_CONFIG`` is the audit config template whose paths are relative to that ``out_dir``.

May import: every other subpackage (the demo runs the whole pipeline end to end).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.demo.synth import DEFAULT_ROOMS, DEFAULT_SHORTCUT_ROOMS, generate_dataset

__all__ = [
    "DEFAULT_ROOMS",
    "DEFAULT_SHORTCUT_ROOMS",
    "DEMO_CONFIG",
    "DemoFiles",
    "generate_dataset",
    "prepare_demo",
    "train_demo_model",
]

#: Audit config template (docs/design.md, "Configuration"); its paths are relative to the
#: demo folder.
DEMO_CONFIG = Path(__file__).with_name("demo.yaml")

_FROM_TRAIN = ("DemoFiles", "prepare_demo", "train_demo_model")


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `python -m pipeline.demo.train` does not find its own
    # module already imported by this package (runpy warns about that).
    if name in _FROM_TRAIN:
        from pipeline.demo import train

        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
