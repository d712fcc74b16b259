"""Network architectures shipped with occlusion-audit.

`SeedCNN` and `SeedCNNWithGAP` reproduce the small convolutional regressors/classifiers of the
public road-following and pot-plant tutorials, with the same ``state_dict`` key names
(``conv_layers.*``, ``fc_layers.*``, ``fc.*``) so that their published checkpoints load unchanged.
`SmallResNet` is a residual network small enough to train on a CPU in minutes, deep enough that
a window's projective field covers most of its last maps (what the approximate engine truncates).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SeedCNN", "SeedCNNWithGAP", "SmallResNet", "projection_shortcut"]

_FILTERS = (16, 32, 64)


def _conv_blocks(in_channels: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_channels
    for f in _FILTERS:
        layers += [nn.Conv2d(c, f, kernel_size=3, padding=1), nn.ReLU()]
        if pool:
            layers.append(nn.MaxPool2d(2))
        c = f
    return nn.Sequential(*layers)


class SeedCNN(nn.Module):
    """Three 3x3 conv + ReLU + 2x2 max-pool blocks (16/32/64 filters), then an MLP head.

    Args:
        num_classes: outputs of the last linear layer (1 for a steering regressor).
        input_dim: side of the square input in pixels; must be divisible by 8.
        in_channels: input channels (3 for RGB).
        dropout: dropout probability before the first linear layer.

    Shapes:
        input ``(N, in_channels, input_dim, input_dim)`` -> output ``(N, num_classes)``.

    Example:
        >>> SeedCNN(num_classes=1, input_dim=64)(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 1])
    """

    def __init__(
        self, num_classes: int = 1, input_dim: int = 224, in_channels: int = 3, dropout: float = 0.5
    ) -> None:
        super().__init__()
        if input_dim % 8:
            raise ValueError(f"SeedCNN input_dim must be divisible by 8, got {input_dim}")
        side = input_dim // 8
        self.conv_layers = _conv_blocks(in_channels, pool=True)
        self.fc_layers = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(_FILTERS[-1] * side * side, 500),
            nn.ReLU(),
            nn.Linear(500, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_layers(x)  # (N, 64, D/8, D/8)
        return self.fc_layers(torch.flatten(x, 1))  # (N, num_classes)


class SeedCNNWithGAP(nn.Module):
    """Three 3x3 conv + ReLU blocks without pooling, global average pooling, one linear layer.

    Shapes:
        input ``(N, in_channels, H, W)`` (any size) -> output ``(N, num_classes)``.
    """

    def __init__(
        self, num_classes: int = 1, in_channels: int = 3, input_dim: int | None = None
    ) -> None:
        # input_dim is accepted (and ignored: GAP works at any size) so that a config can switch
        # between the two architectures without editing kwargs.
        super().__init__()
        self.conv_layers = _conv_blocks(in_channels, pool=False)
        self.fc = nn.Linear(_FILTERS[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_layers(x)  # (N, 64, H, W)
        return self.fc(x.mean(dim=(2, 3)))  # (N, num_classes)


def projection_shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    """A residual block's shortcut: the identity, or where the block changes the side or the
    channels, a strided 1x1 convolution and BatchNorm (He et al. 2016, option B)."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class _BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers (the first carries the stride) plus the input, projected
    by a strided 1x1 conv when the shape changes (He et al. 2016, https://arxiv.org/abs/1512.03385).
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = projection_shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A 3x3 stem, four basic residual blocks (``width``, 2, 4 and 4 times ``width`` filters; the
    last three halve the side), global average pooling and one linear layer: 40K parameters at
    the default width 8.

    Args:
        num_classes: outputs of the linear layer (1 for a steering regressor).
        in_channels: input channels (3 for RGB).
        input_dim: accepted and ignored (global pooling takes any size), so that a config can
            switch from ``SeedCNN`` without editing ``kwargs``.
        width: filters of the stem and the first block; 8 trains on 600 64x64 views in about
            two minutes on 2 CPU threads.

    Shapes:
        input ``(N, in_channels, H, W)``, ``H, W >= 8`` -> output ``(N, num_classes)``.

    Example:
        >>> SmallResNet(num_classes=1)(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 1])
    """

    def __init__(
        self,
        num_classes: int = 1,
        in_channels: int = 3,
        input_dim: int | None = None,
        width: int = 16,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        blocks, c = [], width
        for factor, stride in ((1, 1), (2, 2), (4, 2), (4, 2)):
            blocks.append(_BasicBlock(c, factor * width, stride))
            c = factor * width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))  # (N, 4 * width, H/8, W/8)
        return self.fc(x.mean(dim=(2, 3)))  # (N, num_classes)
