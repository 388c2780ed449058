"""Convolutional networks for the locality experiments, in plain PyTorch.

Razin, Maman & Cohen, "Implicit Regularization in Hierarchical Tensor Factorization
and Deep Convolutional Neural Networks", ICML 2022, Section 6, train a ResNet18 from
scratch with one output logit (one input channel for Pathfinder) on 224 x 224
Is-Same-Class canvases and Pathfinder images.  This module builds

* :class:`ResNet18` -- the ResNet18 topology (He et al. 2016): BasicBlocks in four
  stages of two blocks with widths ``w, 2w, 4w, 8w`` (stride 2 at stages 2-4),
  BatchNorm, ReLU, global average pooling and a linear head.  ``stem="imagenet"`` is
  the published 224 x 224 setting (7 x 7 stride-2 convolution, 3 x 3 stride-2 max
  pool); at ``width=64``, ``in_channels=3``, ``num_outputs=1000`` it has the
  11,689,512 parameters of the standard ImageNet ResNet18.  ``stem="small"`` (3 x 3
  stride-1 convolution, no max pool) keeps resolution for small inputs such as
  32 x 32;
* :class:`SmallCNN` -- a cheap plain CNN for tests and quick sweeps.

torchvision is deliberately not used (its wheels do not import next to the CPU torch
on the machines this project targets).
"""

from __future__ import annotations

import torch
from torch import nn

from implreg.cnn.batchnorm import BatchNorm2d
from implreg.cnn.conv import Conv2d
from implreg.config import ConfigError

__all__ = ["ResNet18", "SmallCNN", "build_model", "count_parameters"]

STEMS = ("small", "imagenet")
MODELS = ("resnet18", "cnn")


def _check_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_stem(stem) -> str:
    if stem not in STEMS:
        raise ConfigError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
    return stem


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _init_weights(module: nn.Module) -> None:
    """Kaiming-normal convolutions (fan-out, ReLU gain), BatchNorm to (1, 0).

    The usual ResNet initialization; the linear head keeps PyTorch's default.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _head_output(logits: torch.Tensor, num_outputs: int) -> torch.Tensor:
    return logits.squeeze(1) if num_outputs == 1 else logits


class BasicBlock(nn.Module):
    """Two 3 x 3 convolutions with BatchNorm, and a (projected) identity shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                Conv2d(cin, cout, 1, stride=stride, bias=False), BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """The ResNet18 topology of Razin et al. (ICML 2022, Section 6), in plain PyTorch.

    Input ``(B, in_channels, H, W)``; output ``(B,)`` logits when ``num_outputs == 1``
    (the published binary tasks), else ``(B, num_outputs)``.  ``width`` is the base
    width (64 in the standard network); the stages have widths ``width * (1, 2, 4, 8)``.
    ``stem="small"``: 3 x 3 stride-1 convolution, no max pool; ``stem="imagenet"``:
    7 x 7 stride-2 convolution and a 3 x 3 stride-2 max pool (the published setting).
    """

    def __init__(
        self, in_channels: int = 1, width: int = 64, num_outputs: int = 1, stem: str = "small"
    ):
        super().__init__()
        _check_int(in_channels, "in_channels")
        _check_int(width, "width")
        _check_int(num_outputs, "num_outputs")
        self.stem_kind = _check_stem(stem)
        self.num_outputs = num_outputs
        if stem == "imagenet":
            self.stem = nn.Sequential(
                Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
                BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            self.stem = nn.Sequential(
                _conv3x3(in_channels, width), BatchNorm2d(width), nn.ReLU(inplace=True)
            )
        stages, cin = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout, stride = width * mult, 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_outputs)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return _head_output(self.fc(torch.flatten(self.pool(h), 1)), self.num_outputs)


class SmallCNN(nn.Module):
    """A small plain CNN: ``depth`` blocks of 3 x 3 convolution + BatchNorm + ReLU.

    All blocks have ``width`` channels; the first keeps the resolution and every later
    block downsamples by a stride-2 convolution (so 32 x 32 inputs become 4 x 4 at
    ``depth=4``); then global average pooling and a linear head.  Output ``(B,)`` when
    ``num_outputs == 1``, else ``(B, num_outputs)``.  A cheap stand-in for the ResNet18
    of Razin et al. (ICML 2022, Section 6) in tests and quick sweeps.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, depth: int = 4, num_outputs: int = 1):
        super().__init__()
        _check_int(in_channels, "in_channels")
        _check_int(width, "width")
        _check_int(depth, "depth")
        _check_int(num_outputs, "num_outputs")
        self.num_outputs = num_outputs
        layers: list[nn.Module] = []
        for i in range(depth):
            cin = in_channels if i == 0 else width
            layers += [
                _conv3x3(cin, width, 1 if i == 0 else 2),
                BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_outputs)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.flatten(self.pool(self.features(x)), 1)
        return _head_output(self.fc(h), self.num_outputs)


def build_model(
    name: str,
    in_channels: int,
    width: int,
    stem: str = "small",
    num_outputs: int = 1,
    depth: int = 4,
) -> nn.Module:
    """The network called ``name``: ``"resnet18"`` (:class:`ResNet18`) or ``"cnn"``.

    ``stem`` selects the ResNet18 stem; it is checked for both names but the plain
    CNN (:class:`SmallCNN`, ``depth`` blocks) has no stem and ignores it; ResNet18 ignores
    ``depth``.
    """
    _check_stem(stem)
    if name == "resnet18":
        return ResNet18(in_channels, width, num_outputs=num_outputs, stem=stem)
    if name == "cnn":
        return SmallCNN(in_channels, width, depth=depth, num_outputs=num_outputs)
    raise ConfigError(f"name must be one of {', '.join(MODELS)}, got {name!r}")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter entries of ``model`` (BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
