"""The ``model:`` section: where the network comes from and which of its outputs is explained.

One source per config (docs/design.md, "Configuration"): an archive (``torchscript``, ``export``,
``onnx``, or a ``hub`` file alone) or a builder (``factory``, ``timm``, ``torchvision``,
``transformers``) that may take a ``state_dict`` (``weights``, or ``hub``). Nothing is imported
or read here: the libraries behind a source are imported when the model is loaded.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.config.typed import fail
from pipeline.kernel.targets import Score, Task
from pipeline.storage.hub import HubFile
from pipeline.storage.paths import resolve_local

__all__ = ["ARCHIVES", "BUILDERS", "ModelConfig", "Target", "is_local_folder"]

#: sources whose file holds the whole model
ARCHIVES = ("torchscript", "export", "onnx")
#: sources that build the module in code; each takes ``kwargs`` and an optional state_dict
BUILDERS = ("factory", "timm", "torchvision", "transformers")
_SOURCES = (*ARCHIVES, *BUILDERS, "hub")

# "module:callable", both parts Python dotted names: the one check of model.factory
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
# timm names carry a pretrained tag after a dot (resnet50.a1_in1k); "hf-hub:" names are refused
_TIMM = re.compile(r"[A-Za-z0-9_][\w.-]*")
_TORCHVISION = re.compile(r"[A-Za-z_]\w*")
_REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


class Target(str, enum.Enum):
    PREDICTED = "predicted"  # the unoccluded argmax
    LABEL = "label"  # the manifest label, as a class index

    def __str__(self) -> str:  # messages and f-strings show the YAML spelling
        return str(self.value)


def is_local_folder(ref: str) -> bool:
    """Whether a ``model.transformers`` value names a local folder rather than a Hub repo id:
    an absolute path, or one starting with ``.`` or ``~`` (relative folders are made absolute
    by the loader when they exist beside the config)."""
    return os.path.isabs(ref) or ref.startswith((".", "~"))


def _check_name(key: str, value: str, pattern: re.Pattern[str], example: str) -> None:
    if not pattern.fullmatch(value):
        fail(key, f"must be a model name such as {example}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Where the model comes from and what score of it is explained."""

    torchscript: str | None = None  # torch.jit.save archive: local path or hf://
    export: str | None = None  # torch.export program (.pt2): local path or hf://
    onnx: str | None = None  # ONNX file (forward passes through onnxruntime): local or hf://
    factory: str | None = None  # "module:callable" returning an nn.Module
    timm: str | None = None  # timm.create_model name (random weights unless model.weights)
    torchvision: str | None = None  # torchvision.models.get_model name (weights=None)
    # from_pretrained source: a local folder (save_pretrained) or a Hub repo id
    transformers: str | None = None
    revision: str | None = None  # transformers Hub repo: a 40-hex commit pins the weights
    # a builder's keyword arguments; onnx: onnxruntime.SessionOptions attributes
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    weights: str | None = None  # a builder's state_dict (local or hf://), read weights_only
    hub: HubFile | None = None  # a model file on the Hub; with a builder: its state_dict
    # folder the factory's module is imported from first; the loader sets it to the config
    # file's folder when the module is there (my_models.py beside the YAML)
    factory_dir: str | None = None
    # the score tensor of a ModelOutput, dict (key) or tuple (index); null: "logits", else the
    # first tensor
    output: str | int | None = None
    task: Task = Task.CLASSIFICATION
    score: Score = Score.LOGIT  # classification only
    target: int | Target = Target.PREDICTED  # output explained: predicted, label or an index

    def __post_init__(self) -> None:
        for key in ("torchscript", "export", "onnx", "weights", "factory_dir"):
            value = getattr(self, key)
            if value is not None and not str(value).strip():
                fail(key, "must be a non-empty path")
            object.__setattr__(self, key, None if value is None else resolve_local(value, None))
        object.__setattr__(self, "kwargs", dict(self.kwargs))  # a copy the caller cannot edit
        self._check_source()
        self._check_names()
        if isinstance(self.output, int) and self.output < 0:
            fail("output", f"must be a key or an index >= 0, got {self.output}")
        if isinstance(self.output, str) and not self.output.strip():
            fail("output", "must be a non-empty key (e.g. logits) or an index")
        if isinstance(self.target, int) and self.target < 0:
            fail("target", f"must be >= 0, got {self.target}")
        if self.task is Task.REGRESSION:
            if self.score is Score.PROBABILITY:
                fail("score", "'probability' applies only to task: classification")
            if self.target is Target.LABEL:
                fail("target", "'label' is a class index; use predicted or an output index")

    def _check_source(self) -> None:
        sources = [k for k in _SOURCES if getattr(self, k)]
        builder = [k for k in sources if k in BUILDERS]
        if len(builder) == 1 and sources == [*builder, "hub"]:
            if self.weights is not None:
                fail("weights", f"give either weights or hub as model.{builder[0]}'s state_dict")
            name = self.hub.filename if self.hub is not None else ""
            if name.endswith((".pt2", ".onnx")):
                kind = "a torch.export archive" if name.endswith(".pt2") else "an ONNX file"
                fail(
                    "hub.filename",
                    f"{name!r} is {kind}, not a state_dict; drop model.{builder[0]} to load it "
                    "as an archive",
                )
        elif len(sources) != 1:
            found = ", ".join(sources) or "none"
            fail("", f"needs exactly one of {', '.join(_SOURCES)}; got {found}")
        if self.weights is not None and not builder:
            fail("weights", f"applies only with {', '.join(BUILDERS)}")
        if self.kwargs and not (builder or self.onnx):
            fail("kwargs", f"applies only with {', '.join(BUILDERS)} or onnx")
        if self.factory_dir is not None and self.factory is None:
            fail("factory_dir", "applies only with factory")
        if self.revision is not None:
            if self.transformers is None or is_local_folder(self.transformers):
                fail("revision", "applies only with model.transformers as a Hub repo id")
            if not self.revision.strip():
                fail("revision", "is empty; give a commit hash or leave it out")

    def _check_names(self) -> None:
        if self.factory is not None and not _FACTORY.fullmatch(self.factory):
            fail(
                "factory",
                f"must be 'module:callable' (e.g. pipeline.models:SeedCNN), got {self.factory!r}",
            )
        if self.timm is not None:
            _check_name("timm", self.timm, _TIMM, "resnet50 (timm.list_models() lists them)")
        if self.torchvision is not None:
            example = "resnet50 (torchvision.models.list_models() lists them)"
            _check_name("torchvision", self.torchvision, _TORCHVISION, example)
        ref = self.transformers
        if ref is None:
            return
        if is_local_folder(ref):
            object.__setattr__(self, "transformers", resolve_local(ref, None))
        elif not _REPO_ID.fullmatch(ref):
            fail(
                "transformers",
                f"must be a local folder (save_pretrained) or a Hub repo id 'owner/name', "
                f"got {ref!r}",
            )

    @property
    def source(self) -> str:
        """``kind:reference`` of the model, e.g. ``timm:resnet50`` or ``export:/m/model.pt2``;
        a builder with a state_dict adds ``+weights`` (what ``run.json`` records)."""
        kind = next(k for k in _SOURCES if getattr(self, k))
        text = f"{kind}:{getattr(self, kind)}"
        if kind == "transformers" and self.revision:
            text += f"@{self.revision}"
        if kind in BUILDERS and (self.weights or self.hub):
            text += f"+weights:{self.weights or self.hub}"
        return text
