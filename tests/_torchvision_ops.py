"""Test-only: torchvision's Python model code beside a torch its C++ extension was not built for.

The test environment has the CPU build of torch 2.13, and the only torchvision 0.28 wheel the
package registry serves (the release made for torch 2.13) is a CUDA build: its ``_C`` extension
links CUDA libraries the CPU torch lacks, fails to load, and torchvision's import then dies in
``register_fake("torchvision::nms")`` with ``operator torchvision::nms does not exist``. timm and
transformers import torchvision, so they die too. Classification models never call torchvision's
C++ operators (NMS, RoI pooling, deformable convolution), so defining the schemas of the two
operators that torchvision registers fake kernels for unconditionally lets its pure-Python code
import. Nothing here is in the package: ``tests/conftest.py`` installs it in the test process,
and ``tests/_startup/sitecustomize.py`` in the processes the tests start (the CLI, Ray workers).

Where the extension loads (a matching torch/torchvision pair, as on users' machines) this does
nothing: defining the schemas there would clash with torchvision's own registration.
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.util
import os
import sys
from typing import Any

# schemas of torchvision/csrc/ops/nms.cpp and the quantized variant torchvision's Python code
# references (torchvision/_meta_registrations.py registers fake kernels for both)
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARY: list[Any] = []  # keeps the torch.library.Library (and so the schemas) alive


def _define_if_extension_fails() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    import torch

    found = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    try:
        if not found:
            raise OSError("no _C extension")
        torch.ops.load_library(found[0])  # what torchvision itself tries first
        return
    except OSError:
        pass
    library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        library.define(schema)
    _LIBRARY.append(library)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs the check once, when ``torchvision`` is first imported; finds nothing itself."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torchvision":
            sys.meta_path.remove(self)
            _define_if_extension_fails()
        return None


def allow_torchvision_without_its_extension() -> None:
    """Install the check before torchvision's first import in this process (idempotent)."""
    if "torchvision" in sys.modules or _LIBRARY:
        return
    if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
