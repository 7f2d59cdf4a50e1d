"""Small-width copies of the networks users bring, written the way torchvision writes them.

Structure mirrors torchvision's source (``torchvision/models/resnet.py``, ``mobilenetv2.py``,
``mobilenetv3.py``, ``efficientnet.py``) at a few channels and one block per stage, so the
tests exercise the layouts (a shared ``self.relu`` called twice, ``out += identity``,
functional pooling, linear bottlenecks, squeeze-excitation) without the cost. The DS-CNN is
Zhang et al. 2017 ("Hello Edge") on Conv1d over MFCC frames.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn import functional as F

from lowbit.data import Dataset

# name -> (float model factory, input shape (C, H, W), classes); filled in at the end
ARCHS: dict = {}


def synthetic_data(shape: tuple[int, ...], classes: int, n: int = 64, seed: int = 0) -> Dataset:
    """Random uint8 images with random labels (normalised by mean 127.5, std 64)."""
    g = torch.Generator().manual_seed(seed)
    return Dataset("synthetic", torch.randint(0, 256, (n, *shape), dtype=torch.uint8,
                                              generator=g),
                   torch.randint(0, classes, (n,), generator=g), tuple(map(str, range(classes))),
                   (127.5,) * shape[0], (64.0,) * shape[0])


def teacher(arch: str, data: Dataset, archs: dict | None = None) -> nn.Module:
    """``arch``'s float model with BatchNorm statistics of ``data`` (init statistics would make
    a network whose logits barely depend on its input) and affine parameters like a trained
    one's (init ones fold to equal int32 biases, which the file stores once), in eval mode."""
    make, _, _ = (ARCHS if archs is None else archs)[arch]
    torch.manual_seed(0)
    model = make().train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average over the batches below
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.2)
    with torch.no_grad():
        model((data.images.float() - 127.5) / 64)
    return model.eval()


# ------------------------------------------------------------------------------ ResNet18/50


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1,
                     groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    def __init__(self, block, layers: list[int], num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet18() -> ResNet:
    return ResNet(BasicBlock, [2, 1, 1, 1], width=8)


def resnet50() -> ResNet:
    return ResNet(Bottleneck, [1, 1, 1, 1], width=4)


# ------------------------------------------------------------------------------ MobileNetV2


class Conv2dNormActivation(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, activation_layer=nn.ReLU6) -> None:
        layers = [nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2,
                            groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1))
        layers.extend([
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),  # linear bottleneck
            nn.BatchNorm2d(oup),
        ])
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        setting = [[1, 8, 1, 1], [4, 8, 2, 2], [4, 16, 2, 2]]  # t, c, n, s
        features: list[nn.Module] = [Conv2dNormActivation(3, 8, stride=2)]
        cin = 8
        for t, c, n, s in setting:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, expand_ratio=t))
                cin = c
        features.append(Conv2dNormActivation(cin, 32, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


# ------------------------------------------------------------------------ MobileNetV3-small


class SqueezeExcitation(nn.Module):
    def __init__(self, input_channels: int, squeeze_channels: int, activation=nn.ReLU,
                 scale_activation=nn.Hardsigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.avgpool(x)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self._scale(x)
        return scale * x


class _ResidualBlock(nn.Module):
    """``block(x)``, plus ``x`` in place when the block keeps the shape (torchvision's
    MobileNetV3 and EfficientNet blocks share this forward)."""

    block: nn.Sequential
    use_res_connect: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result


class V3Block(_ResidualBlock):
    """torchvision's MobileNetV3 InvertedResidual (expand, depthwise, SE, project)."""

    def __init__(self, cin: int, k: int, exp: int, cout: int, use_se: bool, act, stride: int):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(Conv2dNormActivation(cin, exp, kernel_size=1, activation_layer=act))
        layers.append(Conv2dNormActivation(exp, exp, kernel_size=k, stride=stride, groups=exp,
                                           activation_layer=act))
        if use_se:
            layers.append(SqueezeExcitation(exp, max(exp // 4, 8)))
        layers.append(Conv2dNormActivation(exp, cout, kernel_size=1, activation_layer=None))
        self.block = nn.Sequential(*layers)



class MobileNetV3Small(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        hs, re = nn.Hardswish, nn.ReLU
        self.features = nn.Sequential(
            Conv2dNormActivation(3, 8, stride=2, activation_layer=hs),
            V3Block(8, 3, 8, 8, True, re, 2),
            V3Block(8, 3, 24, 12, False, re, 2),
            V3Block(12, 3, 24, 12, False, re, 1),
            V3Block(12, 5, 32, 16, True, hs, 1),
            Conv2dNormActivation(16, 48, kernel_size=1, activation_layer=hs))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(48, 64), nn.Hardswish(inplace=True),
                                        nn.Dropout(p=0.2, inplace=True), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# -------------------------------------------------------------------- EfficientNet-B0 MBConv


class MBConv(_ResidualBlock):
    """torchvision's EfficientNet MBConv: expand (SiLU), depthwise (SiLU), SE (SiLU, Sigmoid),
    project; stochastic depth is the identity in eval and left out."""

    def __init__(self, cin: int, expand_ratio: int, k: int, stride: int, cout: int) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        exp = cin * expand_ratio
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(Conv2dNormActivation(cin, exp, kernel_size=1, activation_layer=nn.SiLU))
        layers.append(Conv2dNormActivation(exp, exp, kernel_size=k, stride=stride, groups=exp,
                                           activation_layer=nn.SiLU))
        layers.append(SqueezeExcitation(exp, max(1, cin // 4), activation=nn.SiLU,
                                        scale_activation=nn.Sigmoid))
        layers.append(Conv2dNormActivation(exp, cout, kernel_size=1, activation_layer=None))
        self.block = nn.Sequential(*layers)



class EfficientNetB0Block(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            Conv2dNormActivation(3, 8, stride=2, activation_layer=nn.SiLU),
            MBConv(8, 1, 3, 1, 8), MBConv(8, 4, 3, 2, 12), MBConv(12, 4, 5, 1, 12),
            Conv2dNormActivation(12, 32, kernel_size=1, activation_layer=nn.SiLU))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=0.2, inplace=True), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# ------------------------------------------------------------------------------ DS-CNN (KWS)


class DSCNN(nn.Module):
    """Keyword spotting on MFCC frames ``[N, 1, features, time]``: a Conv1d over time with
    the MFCC features as channels, depthwise-separable Conv1d blocks, average pool, linear."""

    def __init__(self, features: int = 10, width: int = 16, blocks: int = 2,
                 num_classes: int = 12) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(features, width, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(width)
        layers: list[nn.Module] = []
        for _ in range(blocks):
            layers += [nn.Conv1d(width, width, 3, padding=1, groups=width, bias=False),
                       nn.BatchNorm1d(width), nn.ReLU(),
                       nn.Conv1d(width, width, 1, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
        self.ds = nn.Sequential(*layers)
        self.dropout = nn.Dropout(0.4)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1, 2)  # [N, 1, F, T] -> [N, F, T]
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.ds(x)
        x = x.mean(-1)  # global average over time
        return self.fc(self.dropout(x))


ARCHS.update({
    "resnet18": (resnet18, (3, 16, 16), 10),
    "resnet50": (resnet50, (3, 16, 16), 10),
    "mobilenet_v2": (MobileNetV2, (3, 16, 16), 10),
    "mobilenet_v3_small": (MobileNetV3Small, (3, 16, 16), 10),
    "efficientnet_b0_block": (EfficientNetB0Block, (3, 16, 16), 10),
    "ds_cnn": (DSCNN, (1, 10, 16), 12),
})
