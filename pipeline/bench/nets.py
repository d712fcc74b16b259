"""Networks for ``occlusion-audit bench``: the shipped seed CNNs, ``small-resnet``
(:class:`~pipeline.models.nets.SmallResNet`, four residual blocks), two standard-sized ones, and
any timm, torchvision or Hugging Face ``transformers`` architecture (``timm:NAME``,
``torchvision:NAME``, ``transformers:PATH``) with random weights, so that users time their own,
and a ``torch.export`` archive as it is (``export:FILE.pt2``, its own weights).

``resnet50`` is a ResNet-50 (He et al. 2016, https://arxiv.org/abs/1512.03385): bottleneck blocks
``[3, 4, 6, 3]`` with BatchNorm, 23.5M parameters plus ``2048 * num_classes`` in the head (25.6M
at 1000 classes). ``vgg-small`` is a VGG-style stack of 3x3 convolutions and max-pools
(Simonyan & Zisserman 2014). Weights are random but seeded, which is all timing needs; BatchNorm
statistics are estimated on one seeded random batch so that eval-mode activations stay O(1)
instead of growing block after block (random-init running statistics are 0 and 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.kernel.targets import score_tensor
from pipeline.models import load_model
from pipeline.models.nets import SeedCNN, SeedCNNWithGAP, SmallResNet, projection_shortcut
from pipeline.models.zoo import random_transformers

__all__ = ["BENCH_MODELS", "ZOO", "ResNet50", "VGGSmall", "build_bench_model"]

#: libraries whose architectures ``--model LIBRARY:NAME`` builds with random weights
ZOO = ("timm", "torchvision", "transformers", "export")


class _Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand by 4, plus a projected shortcut."""

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        cout = planes * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, planes, 1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = projection_shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet50(nn.Module):
    """ResNet-50 for ``(N, 3, H, W)`` images of any size >= 32 -> ``(N, num_classes)`` logits."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        ]
        cin = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True)):
            for b in range(blocks):
                layers.append(_Bottleneck(cin, planes, stride=2 if b == 0 and i > 0 else 1))
                cin = planes * 4
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, 2048, H/32, W/32)
        return self.fc(x.mean(dim=(2, 3)))  # (N, num_classes)


class VGGSmall(nn.Module):
    """Eight 3x3 conv + ReLU layers (32..256 filters) with five 2x2 max-pools, GAP, 2-layer MLP.

    Shapes:
        input ``(N, 3, H, W)``, ``H, W >= 32`` -> output ``(N, num_classes)``.
    """

    _CFG = (32, "M", 64, "M", 128, 128, "M", 256, 256, "M", 256, 256, "M")

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in self._CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Linear(c, 256), nn.ReLU(inplace=True), nn.Linear(256, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, 256, H/32, W/32)
        return self.head(x.mean(dim=(2, 3)))  # (N, num_classes)


@torch.no_grad()
def _calibrate_batchnorm(model: nn.Module, image_size: int, seed: int = 0) -> None:
    """Set every BatchNorm's running statistics to those of one seeded batch of 4 images."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch gives exactly its statistics
    gen = torch.Generator().manual_seed(seed)
    model.train()
    model(torch.rand((4, 3, image_size, image_size), generator=gen))


Factory = Callable[[int, int], nn.Module]

#: name -> factory ``(image_size, num_classes) -> nn.Module`` (random weights, not yet eval()).
BENCH_MODELS: dict[str, Factory] = {
    "seed-cnn": lambda size, classes: SeedCNN(num_classes=classes, input_dim=size),
    "seed-cnn-gap": lambda size, classes: SeedCNNWithGAP(num_classes=classes),
    "small-resnet": lambda size, classes: SmallResNet(num_classes=classes),
    "resnet50": lambda size, classes: ResNet50(num_classes=classes),
    "vgg-small": lambda size, classes: VGGSmall(num_classes=classes),
}


class _Scores(nn.Module):
    """The score tensor of a model that returns a ``ModelOutput`` (``logits``), so that every
    engine of the bench, Captum's and the roofline's included, sees a tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return score_tensor(self.model(x))  # (N, num_classes)


def _zoo_model(name: str, num_classes: int, kwargs: Mapping[str, Any]) -> nn.Module:
    """``timm:NAME``, ``torchvision:NAME`` or ``transformers:PATH`` with random weights;
    ``export:FILE`` with the weights the archive holds (it has no BatchNorm module to
    calibrate)."""
    kind, _, ref = name.partition(":")
    if kind == "export":
        if kwargs:
            raise ValueError("--model-kwargs does not apply to an export: archive")
        return load_model(ModelConfig(export=ref))
    try:
        if kind == "transformers":  # PATH: a folder or a cached repo id holding config.json
            return _Scores(random_transformers(ref, {"num_labels": num_classes, **kwargs}))
        fields: dict[str, Any] = {kind: ref, "kwargs": {"num_classes": num_classes, **kwargs}}
        return load_model(ModelConfig(**fields))
    except ImportError as err:  # the library is an extra: say which, as a usage error
        raise ValueError(str(err)) from err


def build_bench_model(
    name: str,
    image_size: int,
    num_classes: int = 10,
    seed: int = 0,
    kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """A seeded benchmark network in eval mode, BatchNorm statistics calibrated.

    Args:
        name: a key of :data:`BENCH_MODELS`, or ``timm:NAME``, ``torchvision:NAME``,
            ``transformers:PATH`` (a folder or Hub repo id with a ``config.json``) or
            ``export:FILE`` (a ``torch.export`` archive with a dynamic batch).
        image_size: square input side in pixels.
        num_classes: outputs of the head.
        seed: seeds the weights and the calibration batch.
        kwargs: keyword arguments of a library's architecture (``{"img_size": 64}``).

    Example:
        >>> build_bench_model("seed-cnn-gap", 32)(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    zoo = name.partition(":")[0] in ZOO and ":" in name
    if not zoo and name not in BENCH_MODELS:
        raise ValueError(
            f"unknown bench model {name!r}; choose one of {sorted(BENCH_MODELS)} or "
            "timm:NAME, torchvision:NAME, transformers:PATH, export:FILE"
        )
    if kwargs and not zoo:
        raise ValueError(f"--model-kwargs applies to LIBRARY:NAME models, not {name!r}")
    with torch.random.fork_rng(devices=[]):  # seed the weights without touching the caller's RNG
        torch.manual_seed(seed)
        if zoo:
            model = _zoo_model(name, num_classes, kwargs or {})
        else:
            model = BENCH_MODELS[name](image_size, num_classes)
    _calibrate_batchnorm(model, image_size, seed)
    return model.eval()


class Tiny(nn.Module):
    """One 8x8 convolution to one output, ``(N, 3, 8, 8) -> (N, 1)``: a model whose cost is
    negligible, so a run of it measures the pipeline's own cost per image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(1)  # (N, 1)
