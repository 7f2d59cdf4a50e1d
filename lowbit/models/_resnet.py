"""CIFAR ResNets of He et al. (2016, section 4.2): 6n+2 layers, 16/32/64 channels.

Shortcuts that change shape use a 1x1 projection (option B), so the whole network is built
from Conv2d/BatchNorm/ReLU/Linear and quantizes and exports uniformly. ``width`` multiplies
every channel count: ResNet20xN are the wide teachers of Shin, Boo & Sung (2019).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UsageError
from .registry import register_model


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (projected) input, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: stem, three stages of n blocks, global pool, linear."""

    def __init__(self, depth: int, num_classes: int = 10, width: int = 1, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise UsageError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        c = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, c[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c[0])
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], c[0]
        for i, cout in enumerate(c):
            blocks = [BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1)
                      for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # [B, 16w, 32, 32]
        x = self.layer3(self.layer2(self.layer1(x)))  # [B, 64w, 8, 8]
        return self.fc(torch.flatten(self.pool(x), 1))  # [B, classes]


@register_model
def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet20 (0.27 M parameters on CIFAR-10)."""
    return CifarResNet(20, num_classes, 1, in_channels)


@register_model
def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet32 (0.47 M parameters)."""
    return CifarResNet(32, num_classes, 1, in_channels)


@register_model
def resnet44(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet44 (0.66 M parameters)."""
    return CifarResNet(44, num_classes, 1, in_channels)


@register_model
def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet56 (0.86 M parameters)."""
    return CifarResNet(56, num_classes, 1, in_channels)


@register_model
def wide_resnet20(num_classes: int = 10, width: int = 2, in_channels: int = 3) -> CifarResNet:
    """ResNet20xN: ResNet20 with every channel count multiplied by ``width`` (Shin et al.)."""
    if width < 1:
        raise UsageError(f"width must be >= 1, got {width}")
    return CifarResNet(20, num_classes, width, in_channels)
