"""Tiny models of every source a user brings, written to disk the way their libraries write them.

Random weights, a few layers each: Hugging Face folders through ``save_pretrained`` (and a Hub
cache laid out as huggingface_hub lays it out, for offline loading by repo id and commit),
``torch.export`` archives with and without a dynamic batch, ONNX files through torch's exporter,
and timm/torchvision architectures shrunk through their constructors' keyword arguments.
Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.models import SeedCNNWithGAP

SIDE = 32  # image side of the zoo tests, pixels
CLASSES = 3
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# timm architectures at 32 px with kwargs that keep them to a few layers where the
# constructor takes them (ViTs: 8-px patches, two blocks)
_VIT = {"img_size": SIDE, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
TIMM: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet": ("resnet10t", {}),
    "convnext": ("convnext_atto", {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}),
    "efficientnet": ("efficientnet_b0", {}),
    "regnet": ("regnetx_002", {}),
    "vit": ("vit_tiny_patch16_224", _VIT),
    "deit": ("deit_tiny_patch16_224", _VIT),
}


def tiny_hf(kind: str) -> nn.Module:
    """A random ``transformers`` image classifier of ``kind`` (vit, convnext, resnet)."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "vit":
        cfg: Any = tf.ViTConfig(
            image_size=SIDE,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=CLASSES,
        )
        return tf.ViTForImageClassification(cfg).eval()
    if kind == "convnext":
        cfg = tf.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3)
        return tf.ConvNextForImageClassification(cfg).eval()
    cfg = tf.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3
    )
    return tf.ResNetForImageClassification(cfg).eval()


def hf_folder(kind: str, folder: Path) -> Path:
    """``save_pretrained`` of :func:`tiny_hf` into ``folder``; returns ``folder``."""
    tiny_hf(kind).save_pretrained(folder)
    return folder


def hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> Path:
    """The files of ``folder`` as huggingface_hub caches a repo at ``commit`` (blobs, snapshot
    links, ``refs/main``); returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def gap_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SeedCNNWithGAP(num_classes=CLASSES).eval()


def export_pt2(
    path: Path,
    dynamic: bool = True,
    side: int = SIDE,
    batch: int = 2,
    model: nn.Module | None = None,
    decompose: bool = False,
) -> Path:
    """``torch.export`` of ``model`` (default :func:`gap_net`) at ``batch`` images of ``side``
    px; ``dynamic`` gives the batch dimension a ``Dim`` (else the archive accepts only
    ``batch`` images); ``decompose`` saves it after the core aten decompositions."""
    x = torch.rand(batch, 3, side, side)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    net = gap_net() if model is None else model
    program = torch.export.export(net, (x,), dynamic_shapes=shapes)
    torch.export.save(program.run_decompositions() if decompose else program, path)
    return path


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = gap_net()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.net(x)
        return y, -y


def export_onnx(path: Path, dynamic: bool = True, two_outputs: bool = False) -> Path:
    """:func:`gap_net` (or a two-output variant: logits and their negation) as ONNX."""
    model: nn.Module = _TwoHeads().eval() if two_outputs else gap_net()
    names = ["logits", "negated"] if two_outputs else ["logits"]
    axes = {"x": {0: "batch"}, **{n: {0: "batch"} for n in names}} if dynamic else None
    with warnings.catch_warnings():
        # the TorchScript-based exporter is deprecated upstream; it needs no onnxscript
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.rand(1, 3, SIDE, SIDE),),
            str(path),
            input_names=["x"],
            output_names=names,
            dynamic_axes=axes,
            dynamo=False,
        )
    return path


# timm families the incremental engine refuses: global ops (EfficientNet's squeeze-excitation
# gating, ViT attention over all patches)
_TIMM_GENERIC = {"efficientnet", "vit", "deit"}
# family -> (the model section's source key, the engine `occlusion.engine: auto` picks for it at
# 32 px; generic where the incremental engine refuses the graph)
FAMILIES: dict[str, tuple[str, str]] = {
    **{f"timm-{k}": ("timm", "generic" if k in _TIMM_GENERIC else "incremental") for k in TIMM},
    "hf-vit": ("transformers", "generic"),
    "hf-convnext": ("transformers", "incremental"),
    "hf-resnet": ("transformers", "incremental"),
    "torchvision-resnet18": ("torchvision", "incremental"),
    "export-pt2": ("export", "incremental"),
    "factory-beside-yaml": ("factory", "incremental"),
}

_NETS = """from pipeline.models import SeedCNNWithGAP


def build(classes):
    return SeedCNNWithGAP(num_classes=classes)
"""


def model_section(family: str, folder: Path) -> dict[str, Any]:
    """The ``model`` section of ``family`` as a user writes it, its files written into
    ``folder`` (beside the YAML file, referenced relative to it)."""
    kind, _ = FAMILIES[family]
    if kind == "timm":
        name, kwargs = TIMM[family.removeprefix("timm-")]
        return {"timm": name, "kwargs": {"num_classes": CLASSES, **kwargs}}
    if kind == "transformers":
        hf_folder(family.removeprefix("hf-"), folder / "hf-model")
        return {"transformers": "hf-model"}
    if kind == "torchvision":
        return {"torchvision": "resnet18", "kwargs": {"num_classes": CLASSES}}
    if kind == "export":
        export_pt2(folder / "model.pt2")
        return {"export": "model.pt2"}
    (folder / "my_models.py").write_text(_NETS)
    return {"factory": "my_models:build", "kwargs": {"classes": CLASSES}}
