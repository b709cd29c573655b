"""Classifiers with named feature layers: a small CNN for CPU runs at 8-32 px and the small-stem
ResNet-18 that the D2L and Genifer authors use at every resolution."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["BasicBlock", "ResNetCifar", "resnet18_cifar", "SmallCNN", "small_cnn"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet with the small (CIFAR) stem: a 3x3 stride-1 conv and no max-pool.

    Any input size works (the pooling is adaptive). The stem does not downsample, so ``layer1``
    runs at the input's full resolution and ``layer4`` at 1/8 of it. At ImageNet sizes the
    residual layers then do about 16x the multiply-adds of torchvision's ResNet-18 (whose 7x7
    stride-2 stem and max-pool leave 1/4 of each side): the price of the D2L lab's protocol,
    the same backbone at every resolution (papers/d2l.md B).

    Named feature layers: ``layer1`` .. ``layer4`` (maps), ``features`` (pooled vector),
    head ``linear``.
    """

    def __init__(
        self, num_blocks=(2, 2, 2, 2), num_classes: int = 100, in_channels: int = 3, width: int = 64
    ):
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(width, num_blocks[0], 1)
        self.layer2 = self._make_layer(2 * width, num_blocks[1], 2)
        self.layer3 = self._make_layer(4 * width, num_blocks[2], 2)
        self.layer4 = self._make_layer(8 * width, num_blocks[3], 2)
        self.features = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.linear = nn.Linear(8 * width, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.features(out))


def resnet18_cifar(num_classes: int = 100, in_channels: int = 3, width: int = 64) -> ResNetCifar:
    """Small-stem ResNet-18: Genifer's reference classifier (feature layer ``layer3``) and the D2L
    lab's backbone at every resolution (experiment files name it ``resnet18_cifar``)."""
    return ResNetCifar((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, width=width)


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head; fast at 8-32 px on CPU.

    Named feature layers: ``block1``, ``block2``, ``block3`` (maps), ``features`` (vector),
    head ``classifier``.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, width: int = 32, hidden: int = 128
    ):
        super().__init__()

        def block(cin: int, cout: int, pool: bool) -> nn.Sequential:
            layers = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(2))
            return nn.Sequential(*layers)

        self.block1 = block(in_channels, width, True)
        self.block2 = block(width, 2 * width, True)
        self.block3 = block(2 * width, 2 * width, False)
        self.features = nn.Sequential(
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * width, hidden), nn.ReLU()
        )
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.block3(self.block2(self.block1(x)))))


def small_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> SmallCNN:
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, width=width)
