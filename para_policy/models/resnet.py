"""ResNet-18 with torchvision's module names, written here (no torchvision needed).

Why: DiffusionPolicy's image encoders (``get_resnet('resnet18')``), robomimic's
``ResNet18Conv`` and LeRobot's ``DiffusionRgbEncoder`` are all torchvision's resnet18,
usually with every BatchNorm replaced by ``GroupNorm(C // 16, C)``. The PyPI torchvision
wheel here does not import next to the CPU torch, so the network is rebuilt with the same
names (``conv1``, ``bn1``, ``layer1.0.downsample.1``, ...) and loads their weights as they are.

:func:`resnet18_trunk` is the network without its pooling and classifier,
``nn.Sequential(*list(resnet.children())[:-2])`` as robomimic and LeRobot build it: its
state dict uses indices ``0`` (conv1), ``1`` (bn1), ``4``..``7`` (layer1..layer4).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "ResNet18", "make_norm", "resnet18_trunk"]


def make_norm(channels: int, norm: str) -> nn.Module:
    """``'group'``: ``GroupNorm(channels // 16, channels)`` (DiffusionPolicy's choice); ``'batch'``: BatchNorm2d."""
    if norm == "group":
        return nn.GroupNorm(num_groups=channels // 16, num_channels=channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"norm must be 'group' or 'batch', got {norm!r}")


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: two 3x3 convs with a residual (1x1 conv + norm when the shape changes)."""

    def __init__(self, in_channels: int, channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = make_norm(channels, norm)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = make_norm(channels, norm)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                            make_norm(channels, norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's ``resnet18`` with ``fc = Identity`` (DiffusionPolicy's ``get_resnet``).

    ``forward``: images (N, 3, H, W) → global-average-pooled features (N, 512).
    """

    def __init__(self, norm: str = "group") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(64, norm)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        widths = (64, 128, 256, 512)
        in_channels = 64
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            layer = nn.Sequential(BasicBlock(in_channels, width, stride, norm), BasicBlock(width, width, 1, norm))
            setattr(self, f"layer{i + 1}", layer)
            in_channels = width
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_trunk(norm: str = "group") -> nn.Sequential:
    """ResNet-18 without avgpool and fc: (N, 3, H, W) → (N, 512, ceil(H/32), ceil(W/32))."""
    return nn.Sequential(*list(ResNet18(norm).children())[:-2])
