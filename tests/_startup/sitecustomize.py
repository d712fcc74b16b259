"""Test-only start-up hook of the processes the model tests start (the CLI and Ray workers):
``PYTHONPATH`` names this folder there, and Python imports ``sitecustomize`` at start-up. See
``tests/_torchvision_ops.py``."""

import importlib.util
import pathlib

_PATH = pathlib.Path(__file__).resolve().parents[1] / "_torchvision_ops.py"
_spec = importlib.util.spec_from_file_location("_torchvision_ops", _PATH)
if _spec is not None and _spec.loader is not None:
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    _module.allow_torchvision_without_its_extension()
