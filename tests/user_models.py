"""Models a user writes in their own code: built with ``--arch tests.user_models:NAME``."""

from __future__ import annotations

import torch
import torch.nn as nn


class SmallCNN(nn.Module):
    """Two conv-BN-ReLU layers, global pool, linear: a user's image classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width), nn.ReLU())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))  # [B, classes]


def small_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 8) -> SmallCNN:
    """The factory ``--arch tests.user_models:small_cnn`` names."""
    return SmallCNN(num_classes, in_channels, width)


class SignalNet(nn.Module):
    """A Conv1d classifier of float sequences ``[N, C, L]`` (sensor or audio features)."""

    def __init__(self, in_channels: int = 2, num_classes: int = 3, width: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, width, 5, padding=2)
        self.bn = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean(2))  # [B, classes]


class ViewNet(nn.Module):
    """Flattens with ``x.view(x.size(0), -1)`` after its convs (as many tutorials do): needs
    contiguous NCHW tensors."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1),
                                      nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # [B, w, 4, 4] on 8x8 digits
        return self.fc(x.view(x.size(0), -1))


def view_net(num_classes: int = 10, in_channels: int = 1, width: int = 4) -> ViewNet:
    """The factory ``--arch tests.user_models:view_net`` names."""
    return ViewNet(num_classes, in_channels, width)


class WidthNet(nn.Module):
    """A CNN whose width has no default: saved from Python, lowbit cannot guess it."""

    def __init__(self, width: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))  # [B, classes]
