"""A ResNet-18-style network for 1x28x28 Fashion-MNIST images, and its shipped checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from grailc.models import load_checkpoint

CHECKPOINT = Path(__file__).parent.parent / "data" / "fashion_resnet.safetensors"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus an identity (or 1x1 conv-BN projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=False)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class FashionResNet(nn.Module):
    """Stem conv, four stages of two BasicBlocks (stride 2 from stage 2 on), pooling and a linear head."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 128), num_classes: int = 10):
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"FashionResNet needs four stage widths, got {tuple(widths)}")
        self.conv1 = nn.Conv2d(1, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=False)
        stages = []
        in_channels = widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            stages.append(nn.Sequential(BasicBlock(in_channels, width, stride), BasicBlock(width, width)))
            in_channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def load_pretrained() -> FashionResNet:
    """The FashionResNet trained by ``examples/train_fashion_mnist.py``, in eval mode."""
    return load_checkpoint(FashionResNet(), CHECKPOINT, "Fashion-MNIST", "examples/train_fashion_mnist.py")
