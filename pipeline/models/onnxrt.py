"""ONNX files as torch modules: forward passes through onnxruntime (the ``[onnx]`` extra).

An ONNX graph is opaque to ``torch.fx``, so the incremental engine refuses it and runs use full
forward passes (``run.json`` records the refusal). The session uses the torch thread count of
the process (a worker's share of its node) unless ``model.kwargs`` sets
``intra_op_num_threads``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.models.exported import InputSignature
from pipeline.models.factory import ModelLoadError
from pipeline.models.zoo import require

__all__ = ["OnnxModel", "load_onnx"]


class OnnxModel(nn.Module):
    """``(N, C, H, W)`` float32 -> the graph's output: one tensor, or a dict by output name.

    Args:
        session: an ``onnxruntime.InferenceSession`` with one input.
    """

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_names = [o.name for o in session.get_outputs()]

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        # onnxruntime reads plain C-ordered float32 arrays on the host
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()  # (N, C, H, W)
        raw = self.session.run(None, {self.input_name: arr})
        outs = [torch.from_numpy(o).to(x.device) for o in raw]
        return outs[0] if len(outs) == 1 else dict(zip(self.output_names, outs, strict=True))


def load_onnx(path: Path, kwargs: Mapping[str, Any], device: torch.device) -> nn.Module:
    """An :class:`OnnxModel` for the file at ``path``, its declared input recorded.

    Args:
        kwargs: ``onnxruntime.SessionOptions`` attributes (``intra_op_num_threads``, ...).
        device: CUDA runs on onnxruntime's CUDA provider where it has one, else the CPU.

    Raises:
        ModelLoadError: the file is not an ONNX model, has more than one input, or a kwarg is
            no session option.
    """
    ort = require("onnxruntime", "onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    for key, value in kwargs.items():
        if not hasattr(options, key):
            raise ModelLoadError(
                f"model.kwargs.{key}: not an onnxruntime.SessionOptions attribute (e.g. "
                "intra_op_num_threads, inter_op_num_threads)"
            )
        setattr(options, key, value)
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types for bad files
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelLoadError(f"model.onnx {path}: not a loadable ONNX model ({first})") from err
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise ModelLoadError(
            f"model.onnx {path}: takes {len(inputs)} inputs {names}; one image batch is supported"
        )
    dims = tuple((d, d) if isinstance(d, int) else (0, None) for d in inputs[0].shape)
    return InputSignature("onnx", f"model.onnx {path.name}", dims).attach(OnnxModel(session))
