"""Architectures. Inputs are images in [0, 1]; normalisation is the model's first layer."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# what MadryLab's robustness library normalises CIFAR-10 with (robustness/datasets.py)
ROBUSTNESS_CIFAR_MEAN, ROBUSTNESS_CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


class Normalize(nn.Module):
    """(x - mean) / std per channel, with mean and std stored as buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MadryMnistCNN(nn.Module):
    """Madry et al.'s MNIST CNN: conv 32 5x5, pool, conv 64 5x5, pool, fc 1024, fc 10.

    Input ``(N, 1, 28, 28)`` in [0, 1]; output logits ``(N, 10)``.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.normalize = Normalize(MNIST_MEAN, MNIST_STD)
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(7 * 7 * 64, 1024), nn.ReLU(inplace=True), nn.Linear(1024, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Sequential:
    """A residual block's shortcut: the identity, or a strided 1x1 convolution and BatchNorm where the
    block changes the shape (state_dict keys ``shortcut.0``, ``shortcut.1``, as the zoo's checkpoints)."""
    if stride != 1 or cin != cout:
        return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    return nn.Sequential()


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A CIFAR-style ResNet (3x3 stem, no max-pool) of :class:`BasicBlock` stages.

    Input ``(N, 3, 32, 32)`` in [0, 1]; output logits ``(N, num_classes)``.
    """

    def __init__(self, blocks: Sequence[int] = (2, 2, 2, 2), widths: Sequence[int] = (64, 128, 256, 512),
                 num_classes: int = 10) -> None:
        super().__init__()
        self.normalize = Normalize(CIFAR10_MEAN, CIFAR10_STD)
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        layers, cin = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(self.normalize(x))))


class Bottleneck(nn.Module):
    """ResNet bottleneck block (1x1, 3x3 with the stride, 1x1 to ``4 * planes``), post-activation."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = self.expansion * planes
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class RobustnessResNet(nn.Module):
    """The CIFAR ResNet of MadryLab's ``robustness`` library (``robustness/cifar_models/resnet.py``).

    Module names are theirs (``conv1``, ``bn1``, ``layer1``..``layer4``, ``linear``; blocks with
    ``conv1``.., ``shortcut.0``/``shortcut.1``), so their state_dict keys load 1:1.  Their
    ``normalizer`` (mean/std of the data set) is this model's ``normalize`` layer.

    Input ``(N, 3, 32, 32)`` in [0, 1]; output logits ``(N, num_classes)``.
    """

    def __init__(self, block: type[nn.Module], num_blocks: Sequence[int], num_classes: int = 10,
                 mean: Sequence[float] = ROBUSTNESS_CIFAR_MEAN, std: Sequence[float] = ROBUSTNESS_CIFAR_STD) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (n, planes) in enumerate(zip(num_blocks, (64, 128, 256, 512))):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, stride=2 if (i > 0 and j == 0) else 1))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)  # theirs: 4x4 maps of 32x32 inputs -> 1x1
        return self.linear(out.flatten(1))


def robustness_resnet18(num_classes: int = 10) -> RobustnessResNet:
    """``robustness``'s CIFAR ResNet-18 (BasicBlock, [2, 2, 2, 2])."""
    return RobustnessResNet(BasicBlock, (2, 2, 2, 2), num_classes)


def robustness_resnet50(num_classes: int = 10) -> RobustnessResNet:
    """``robustness``'s CIFAR ResNet-50 (Bottleneck, [3, 4, 6, 3]): their pretrained CIFAR-10 models."""
    return RobustnessResNet(Bottleneck, (3, 4, 6, 3), num_classes)


def resnet18(num_classes: int = 10) -> CifarResNet:
    """ResNet-18 for CIFAR-10 (11M parameters; for GPU training)."""
    return CifarResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes)


def resnet_small(num_classes: int = 10) -> CifarResNet:
    """A small CIFAR ResNet (ResNet-14 at widths 32/64/128, 0.7M parameters) that trains on a CPU."""
    return CifarResNet((2, 2, 2), (32, 64, 128), num_classes)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mnist-cnn": MadryMnistCNN,
    "resnet18": resnet18,
    "resnet-small": resnet_small,
    "robustness-resnet18": robustness_resnet18,
    "robustness-resnet50": robustness_resnet50,
}

DEFAULT_ARCH = {"mnist": "mnist-cnn", "cifar10": "resnet-small"}


def build(arch: str, **kwargs) -> nn.Module:
    """Instantiate an architecture by name (see :data:`ARCHITECTURES`)."""
    from ..errors import UapxError

    if arch not in ARCHITECTURES:
        raise UapxError(f"unknown architecture {arch!r}", f"choose from: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch](**kwargs)
