"""Network architectures shipped with occlusion-audit.

`SeedCNN` and `SeedCNNWithGAP` reproduce the small convolutional regressors/classifiers of the
public road-following and pot-plant tutorials, with the same ``state_dict`` key names
(``conv_layers.*``, ``fc_layers.*``, ``fc.*``) so that their published checkpoints load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SeedCNN", "SeedCNNWithGAP"]

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
