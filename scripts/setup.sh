#!/usr/bin/env bash
# Create .venv with the project and its test/dev extras. torch is pinned to the local CPU build
# first: an unpinned torch pulls several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# timm and torchvision for the model-zoo tests, pinned and without dependencies (both are
# already there: torch, numpy, pillow, pyyaml, huggingface_hub, safetensors): an unpinned
# torchvision would pull torch 2.14 and several GB of CUDA packages. 0.28.0 is torchvision's
# release for torch 2.13; the registry's wheel is a CUDA build whose C++ extension cannot load
# beside the CPU torch, which the tests work around (tests/_torchvision_ops.py); classification
# models never call its C++ operators.
python -m pip install -q --no-deps "torchvision==0.28.0" "timm==1.0.29"
