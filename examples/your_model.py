"""Your own model: a torchvision-style ResNet -> ternary student -> packed ONNX -> runtime.

The network is written the way torchvision writes ResNet (one ``self.relu`` called twice per
block, ``out += identity``, functional pooling): ``lowbit.quantize`` traces it with torch.fx
and returns a graph whose quantizers are nodes. Runs offline in about 20 s on 2 CPU cores
with scikit-learn's bundled 8x8 digits.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import lowbit
from lowbit import data


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv3x3(inplanes, planes, stride), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)  # one module, called twice in forward
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # [B, 16, 8, 8]
        x = self.layer2(self.layer1(x))  # [B, 32, 4, 4]
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # [B, 32]
        return self.fc(x)


train, test = data.digits(), data.digits(train=False)
train, val = data.validation_split(train)  # what epochs report; the test split is for the end
torch.manual_seed(0)

# 1. Your float model, trained as usual (here: lowbit.train).
teacher, _ = lowbit.train(ResNet(), train, val, epochs=10, batch_size=64, lr=0.05,
                          progress=False)

# 2. The quantization-aware student: a torch.fx GraphModule, every quantizer a node.
student = lowbit.quantize(teacher, weight_bits=2, act_bits=4)
print(lowbit.quant.describe(student))  # per layer: weight bits, input bits, onnxruntime kernel

# 3. Knowledge distillation from the float model.
student, record = lowbit.distill(student, teacher, train, val, epochs=4, batch_size=64,
                                 lr=0.02, temperature=4, lam=0.7, progress=False)
print(f"test accuracy: teacher {lowbit.evaluate(teacher, test):.2%}, ternary student "
      f"{lowbit.evaluate(student, test):.2%}")

# 4. Packed ONNX, verified in onnxruntime (float and integer kernels) against the student.
result = lowbit.export(student, "resnet_ternary.onnx", formats=("onnx",), verify=test,
                       data=train)
print(f"onnxruntime kernels: {result.kernels}")

# 5. The torch-free runtime on raw uint8 images.
session = lowbit.Session("resnet_ternary.onnx")
print(f"onnxruntime accuracy {session.evaluate((test.images.numpy(), test.labels.numpy())):.2%}")
