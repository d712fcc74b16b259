"""Which model output a map explains, and how it is scored."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

import torch

__all__ = ["Score", "TargetSpec", "Task", "output_scores", "resolve_targets", "score_tensor"]


class Task(str, Enum):
    CLASSIFICATION = "classification"
    REGRESSION = "regression"


class Score(str, Enum):
    LOGIT = "logit"  # the raw output
    PROBABILITY = "probability"  # softmax over classes (sigmoid for a single logit)


#: ``"predicted"`` | a class/output index for all images | ``N`` indices | ``(N, T)`` indices.
TargetSpec = str | int | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor | None


def score_tensor(out: Any) -> torch.Tensor:
    """The score tensor of a model output: the tensor itself; of a mapping (a Hugging Face
    ``ModelOutput``, a dict) its ``logits``, else its first tensor value; of a tuple or list its
    first tensor. ``model.output`` picks another entry (:class:`pipeline.models.SelectOutput`).

    Raises:
        TypeError: the output holds no tensor.

    Example:
        >>> score_tensor({"loss": None, "logits": torch.ones(2, 3)}).shape
        torch.Size([2, 3])
    """
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        logits = out.get("logits")
        items = [logits, *out.values()]
        what = f"a {type(out).__name__} with keys {list(out.keys())}"
    elif isinstance(out, tuple | list):
        items, what = list(out), f"a {type(out).__name__} of {len(out)}"
    else:
        items, what = [], f"a {type(out).__name__}"
    # a torch.fx proxy stands for a tensor while the incremental engine traces the model
    found = next((v for v in items if isinstance(v, torch.Tensor | torch.fx.Proxy)), None)
    if found is None:
        raise TypeError(
            f"the model returned {what} without a tensor; return the scores as a tensor, or set "
            "model.output to the key or index of the score tensor"
        )
    return found


def output_scores(out: Any, batch: int, task: Task, score: Score) -> torch.Tensor:
    """Turn a model output into per-output scores.

    Args:
        out: model output, ``(B,)`` or ``(B, O)``, or a mapping or tuple holding it
            (:func:`score_tensor`).
        batch: the input batch size ``B`` the output must follow.

    Returns:
        ``(B, O)`` float32 scores.
    """
    out = score_tensor(out)
    if out.dim() == 0 or out.shape[0] != batch:
        raise ValueError(
            f"the model returned shape {tuple(out.shape)} for a batch of {batch} inputs: its "
            "first dimension must follow the input batch"
        )
    if out.dim() > 2:  # flattening (B, 2, 3) into 6 "classes" would explain a wrong output
        raise ValueError(
            f"the model returned shape {tuple(out.shape)}; expected (B,) scores or (B, O) "
            "outputs (wrap the model to select or pool what should be explained)"
        )
    out = out.reshape(batch, -1).float()  # (B, O)
    if task is Task.CLASSIFICATION and score is Score.PROBABILITY:
        return torch.sigmoid(out) if out.shape[1] == 1 else torch.softmax(out, dim=1)
    return out


def resolve_targets(target: TargetSpec, scores: torch.Tensor, task: Task) -> torch.Tensor:
    """Output indices to explain, from the unoccluded scores.

    Args:
        target: ``"predicted"``/``None`` (argmax for classification; the only output for a
            scalar regression), an int, ``N`` ints, or an ``(N, T)`` array for several maps.
        scores: ``(N, O)`` unoccluded scores.

    Returns:
        ``(N, T)`` int64 indices in ``[0, O)``.
    """
    n, o = scores.shape
    if target is None or (isinstance(target, str) and target == "predicted"):
        if task is Task.REGRESSION and o != 1:
            raise ValueError(
                f"a regression model with {o} outputs needs an explicit target output index"
            )
        t = scores.argmax(dim=1, keepdim=True)  # (N, 1); 0 for a single output
    elif isinstance(target, str):
        raise ValueError(f"unknown target {target!r}: use 'predicted' or output indices")
    else:
        t = torch.as_tensor(target, dtype=torch.int64, device=scores.device)
        if t.dim() == 0:
            t = t.expand(n, 1)
        elif t.dim() == 1:
            if t.numel() != n:
                raise ValueError(f"got {t.numel()} targets for {n} images")
            t = t.view(n, 1)
        elif t.dim() != 2 or t.shape[0] != n:
            raise ValueError(f"targets of shape {tuple(t.shape)} do not fit {n} images")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= o):
        raise ValueError(f"target index out of range [0, {o}): {t.flatten().tolist()[:8]}")
    return t.contiguous()
