"""A small CNN for scikit-learn's 8x8 digits: the offline default model of the demo."""

from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_model


class DigitsCNN(nn.Module):
    """Three conv-BN-ReLU layers (8x8 -> 4x4 -> 2x2), global pool, linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        c1, c2, c3 = width, 2 * width, 4 * width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c1), nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 3, 2, 1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(inplace=True),
            nn.Conv2d(c2, c3, 3, 2, 1, bias=False), nn.BatchNorm2d(c3), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # [B, 4w, 2, 2]
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model
def digits_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> DigitsCNN:
    """Small CNN for 8x8 single-channel images (about 24 k parameters at width 16)."""
    return DigitsCNN(num_classes, in_channels, width)
