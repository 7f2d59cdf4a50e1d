"""Small structural copies of the layer types the op registry (``lowbit._ops``) adds.

Each mirrors the source it names at a few channels: a U-Net decoder (``ConvTranspose2d``,
``nn.Upsample``/``F.interpolate``, ``GroupNorm``, skip ``cat``), torchvision's ShuffleNetV2
(``chunk``, ``channel_shuffle``'s ``size``/``//``/``view``/``transpose``, and the
``x.size(1) // 2`` slice split), torchvision's ConvNeXt (``Permute`` + ``LayerNorm`` +
``GELU``, ``LayerNorm2d``, layer scale, ``StochasticDepth``), timm's ``BatchNormAct2d``
(``timm/layers/norm_act.py``, as timm's EfficientNet-B0 uses it) and torchvision's DenseNet
(standalone BatchNorms after a concatenation).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS: dict = {}  # name -> (factory, input shape (C, H, W), classes)


def _cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


# ------------------------------------------------------------------------- U-Net decoder


class UNetTiny(nn.Module):
    """Encoder, then a decoder upsampling by ConvTranspose2d and by Upsample/interpolate,
    GroupNorm in the decoder, skip connections concatenated; a pooled classifier head."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.enc1, self.enc2 = _cbr(3, 8), _cbr(8, 16)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1, bias=False),
                                 nn.GroupNorm(2, 8), nn.ReLU())
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.mix = _cbr(8 + 16, 8)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)  # [N, 8, H, W]
        e2 = self.enc2(self.pool(e1))  # [N, 16, H/2, W/2]
        d = self.dec(torch.cat([self.up(e2), e1], 1))  # [N, 8, H, W]
        skip = self.upsample(e2)  # nearest: codes
        smooth = F.interpolate(e2, scale_factor=2.0, mode="bilinear", align_corners=False)
        y = self.mix(torch.cat([d, skip + smooth], 1))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


# --------------------------------------------------------- torchvision ShuffleNetV2 (0.28)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class ShuffleUnit(nn.Module):
    """torchvision's ``InvertedResidual``: stride 1 splits the input by ``chunk``; ``split``
    "slice" splits it by ``x.size(1) // 2`` slices instead (timm and hand-written copies)."""

    def __init__(self, inp: int, oup: int, stride: int, split: str = "chunk") -> None:
        super().__init__()
        self.stride, self.split = stride, split
        branch = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(True))
        else:
            self.branch1 = nn.Sequential()
        cin = inp if stride > 1 else branch
        self.branch2 = nn.Sequential(
            nn.Conv2d(cin, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(True),
            nn.Conv2d(branch, branch, 3, stride, 1, groups=branch, bias=False),
            nn.BatchNorm2d(branch),
            nn.Conv2d(branch, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.split == "chunk":
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        elif self.stride == 1:
            c = x.size(1) // 2
            out = torch.cat((x[:, :c], self.branch2(x[:, c:])), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2Tiny(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = _cbr(3, 8)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.stage2 = nn.Sequential(ShuffleUnit(8, 16, 2), ShuffleUnit(16, 16, 1),
                                    ShuffleUnit(16, 16, 1, split="slice"))
        self.conv5 = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32),
                                   nn.ReLU(True))
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stage2(self.maxpool(self.conv1(x))))
        return self.fc(x.mean([2, 3]))


# ------------------------------------------------------------------- torchvision ConvNeXt


def stochastic_depth(x: torch.Tensor, p: float, mode: str, training: bool = True):
    """torchvision.ops.stochastic_depth: drops whole samples in training, identity in eval."""
    if not training or p == 0.0:
        return x
    size = [x.shape[0]] + [1] * (x.ndim - 1) if mode == "row" else [1] * x.ndim
    noise = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(1.0 - p)
    return x * noise.div_(1.0 - p)


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth (its training branch reads ``input.ndim``: torch.fx
    cannot trace it, so lowbit keeps it as one call, known by its qualified name)."""

    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(x, self.p, self.mode, self.training)


StochasticDepth.__module__ = "torchvision.ops.stochastic_depth"  # where torchvision has them
stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"


class SDNet(nn.Module):
    """A residual block calling the function form, ``stochastic_depth(x, p, mode,
    self.training)`` (the flag is a constant when torch.fx traces it)."""

    def __init__(self, classes: int = 4, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 3, padding=1), nn.BatchNorm2d(dim),
                                  nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.BatchNorm2d(dim))
        self.fc = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + stochastic_depth(self.block(x), 0.5, "row", self.training))
        return self.fc(x.mean([2, 3]))


class Permute(nn.Module):  # torchvision.ops.misc.Permute
    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class LayerNorm2d(nn.LayerNorm):  # torchvision.models.convnext.LayerNorm2d
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float, sd_prob: float) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim, bias=True), Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim, bias=True), nn.GELU(),
            nn.Linear(4 * dim, dim, bias=True), Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(sd_prob, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.layer_scale * self.block(x)
        result = self.stochastic_depth(result)
        return result + x


class ConvNeXtTiny(nn.Module):
    def __init__(self, classes: int = 4, dim: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, dim, 2, stride=2), LayerNorm2d(dim, eps=1e-6)),
            CNBlock(dim, 0.5, 0.1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dim, eps=1e-6), nn.Flatten(1),
                                        nn.Linear(dim, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


# ------------------------------------------------------------- timm BatchNormAct2d models


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d: BatchNorm, then ``drop``, then ``act``."""

    def __init__(self, num_features: int, act_layer: type = nn.ReLU,
                 apply_act: bool = True) -> None:
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act_layer(inplace=True) if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None \
                else self.momentum
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training or not self.track_running_stats, factor, self.eps)
        return self.act(self.drop(x))


class SqueezeExcite(nn.Module):  # timm.models._efficientnet_blocks.SqueezeExcite
    def __init__(self, chs: int, rd: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(chs, rd, 1, bias=True)
        self.act1 = nn.SiLU(inplace=True)
        self.conv_expand = nn.Conv2d(rd, chs, 1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.conv_expand(self.act1(self.conv_reduce(x_se)))
        return x * self.gate(x_se)


class TimmEfficientNetTiny(nn.Module):
    """timm's EfficientNet-B0 layout: BatchNormAct2d (SiLU) after every conv, a depthwise
    separable block with squeeze-excite, a pointwise-linear projection (act off)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = BatchNormAct2d(8, nn.SiLU)
        self.conv_dw = nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False)
        self.bn_dw = BatchNormAct2d(8, nn.SiLU)
        self.se = SqueezeExcite(8, 2)
        self.conv_pw = nn.Conv2d(8, 8, 1, bias=False)
        self.bn_pw = BatchNormAct2d(8, apply_act=False)
        self.conv_head = nn.Conv2d(8, 16, 1, bias=False)
        self.bn2 = BatchNormAct2d(16, nn.ReLU)
        self.classifier = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv_stem(x))
        x = x + self.bn_pw(self.conv_pw(self.se(self.bn_dw(self.conv_dw(x)))))
        x = self.bn2(self.conv_head(x))
        return self.classifier(x.mean((2, 3)))


# ------------------------------------------------------------------- torchvision DenseNet


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(2 * growth), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)  # the standalone norm1 reads the concatenation
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseNetTiny(nn.Module):
    def __init__(self, classes: int = 4, growth: int = 4) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm0, self.relu0 = nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        self.layer1, self.layer2 = DenseLayer(8, growth), DenseLayer(8 + growth, growth)
        self.norm5 = nn.BatchNorm2d(8 + 2 * growth)
        self.classifier = nn.Linear(8 + 2 * growth, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.relu0(self.norm0(self.conv0(x)))]
        features.append(self.layer1(features))
        features.append(self.layer2(features))
        out = F.relu(self.norm5(torch.cat(features, 1)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


ARCHS.update({
    "unet": (UNetTiny, (3, 8, 8), 4),
    "shufflenet_v2": (ShuffleNetV2Tiny, (3, 16, 16), 4),
    "convnext": (ConvNeXtTiny, (3, 8, 8), 4),
    "timm_efficientnet": (TimmEfficientNetTiny, (3, 8, 8), 4),
    "densenet": (DenseNetTiny, (3, 8, 8), 4),
    "stochastic_depth": (SDNet, (3, 8, 8), 4),
})
