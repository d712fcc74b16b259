"""Tiny deterministic models shared by the kernel tests."""

from __future__ import annotations

import torch
from torch import nn


def tiny_convnet(in_channels: int = 3, outputs: int = 3, seed: int = 0) -> nn.Module:
    """Conv + ReLU + pooling + linear; works on any image size >= 2x2."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, outputs),
    )
    return net.eval()


class ScalarRegressor(nn.Module):
    """Returns a ``(N,)`` output, like a steering regressor with its last dim squeezed."""

    def __init__(self, in_channels: int = 3, seed: int = 0) -> None:
        super().__init__()
        self.net = tiny_convnet(in_channels, 1, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)
