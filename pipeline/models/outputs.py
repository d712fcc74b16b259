"""``model.output``: the score tensor of a model that returns a ``ModelOutput``, dict or tuple.

Without ``model.output`` the kernel takes ``logits``, else the first tensor
(:func:`pipeline.kernel.targets.score_tensor`); with it, :class:`SelectOutput` returns exactly
that entry, or says which entries there are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["SelectOutput", "describe_output"]


def describe_output(out: Any) -> str:
    """A short description of a model output: its type and keys, length or shape."""
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with keys {list(out.keys())}"
    if isinstance(out, tuple | list):
        return f"a {type(out).__name__} of {len(out)}"
    return f"a {type(out).__name__}"


class SelectOutput(nn.Module):
    """``model(x)[key]``: one entry of a mapping (``ModelOutput``, dict) or a tuple.

    Plain indexing, so ``torch.fx`` traces through it (a ``getitem`` node).

    Args:
        model: the network.
        key: a mapping key (``"logits"``) or a tuple index.

    Example:
        >>> m = SelectOutput(nn.Identity(), 0)
        >>> m((torch.ones(2), torch.zeros(2))).tolist()
        [1.0, 1.0]
    """

    # the model gets the input as it is: occlusion.mode token-drop reaches through
    # (pipeline.incremental.tokens)
    keeps_pixel_positions: ClassVar[bool] = True

    def __init__(self, model: nn.Module, key: str | int) -> None:
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, x: Any) -> Any:
        out = self.model(x)
        if isinstance(out, torch.Tensor):  # indexing a tensor would pick a batch row
            raise ValueError(
                f"model.output {self.key!r}: the model returns {describe_output(out)}, not a "
                "mapping or tuple; leave model.output unset"
            )
        try:
            return out[self.key]
        except (KeyError, IndexError, TypeError) as err:
            raise ValueError(
                f"model.output {self.key!r}: the model returns {describe_output(out)}; set "
                "model.output to one of its keys (or a tuple index)"
            ) from err
