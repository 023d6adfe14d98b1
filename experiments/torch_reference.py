"""PyTorch replicas of the zoo networks that have a torchvision / bearpaw layout.

Used by :mod:`experiments.convert` to check a conversion (the logits of the
converted Flax network against those of the PyTorch network holding the same
state dict) and by the conversion tests. Needs ``torch`` (the ``[convert]``
extra); nothing else imports this module.

The modules are written from the architectures (see
``experiments/models/``), with the parameter names and shapes of the state
dicts the two reference code bases save:

* ResNets (ImageNet: torchvision v1.5; CIFAR: bearpaw): ``conv1``, ``bn1``,
  ``layer{s}.{i}.conv{k}`` / ``.bn{k}``, projection shortcut
  ``layer{s}.{i}.downsample.0`` (1x1 conv) / ``.1`` (BN), classifier ``fc``.
* VGGs: ``features.{j}`` (a flat sequence of conv [, BN], ReLU, and max pools),
  then ``classifier`` (CIFAR: one Linear) or ``classifier.{0,3,6}`` (ImageNet:
  Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear after a 7x7 adaptive
  average pool).

:func:`build` makes the replica of a zoo network from the Flax module's fields.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from experiments import models as models_lib


class _Block(nn.Module):
    """Residual block; ``bottleneck`` picks 1x1-3x3-1x1 (x4) over 3x3-3x3."""

    def __init__(self, in_ch: int, planes: int, stride: int, bottleneck: bool, base_width: int = 64):
        super().__init__()
        self.bottleneck = bottleneck
        out_ch = planes * (4 if bottleneck else 1)
        if bottleneck:
            inner = int(planes * (base_width / 64.0))
            self.conv1 = nn.Conv2d(in_ch, inner, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(inner)
            self.conv2 = nn.Conv2d(inner, inner, 3, stride=stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(inner)
            self.conv3 = nn.Conv2d(inner, out_ch, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(out_ch)
        else:
            self.conv1 = nn.Conv2d(in_ch, planes, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        self.out_ch = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        if self.bottleneck:
            y = torch.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
        else:
            y = self.bn2(self.conv2(y))
        skip = x if self.downsample is None else self.downsample(x)
        return torch.relu(y + skip)


class ResNet(nn.Module):
    """ImageNet (7x7/2 stem + max pool, 4 stages) or CIFAR (3x3 stem, 3 stages) ResNet."""

    def __init__(
        self,
        stage_sizes: Sequence[int],
        bottleneck: bool,
        num_classes: int,
        *,
        imagenet: bool,
        width: int,
        base_width: int = 64,
    ):
        super().__init__()
        self.imagenet = imagenet
        if imagenet:
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        in_ch = width
        for s, n in enumerate(stage_sizes):
            blocks = []
            for i in range(n):
                stride = 2 if (s > 0 and i == 0) else 1
                block = _Block(in_ch, width * 2**s, stride, bottleneck, base_width)
                in_ch = block.out_ch
                blocks.append(block)
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.num_stages = len(stage_sizes)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        if self.imagenet:
            x = nn.functional.max_pool2d(x, 3, stride=2, padding=1)
        for s in range(self.num_stages):
            x = getattr(self, f"layer{s + 1}")(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class VGG(nn.Module):
    """VGG: ``features`` from ``cfg``, then the CIFAR or ImageNet classifier."""

    def __init__(
        self,
        cfg: Sequence[Any],
        num_classes: int,
        *,
        batch_norm: bool,
        imagenet: bool,
        hidden: int = 4096,
        dropout: float = 0.5,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers.append(nn.Conv2d(in_ch, int(v), 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(v)))
            layers.append(nn.ReLU(inplace=True))
            in_ch = int(v)
        self.features = nn.Sequential(*layers)
        self.imagenet = imagenet
        if imagenet:
            self.classifier = nn.Sequential(
                nn.Linear(in_ch * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(dropout),
                nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(dropout),
                nn.Linear(hidden, num_classes),
            )
        else:
            self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if self.imagenet:
            x = nn.functional.adaptive_avg_pool2d(x, 7)
        return self.classifier(torch.flatten(x, 1))


def build(name: str, num_classes: int, **model_kwargs: Any) -> nn.Module:
    """The PyTorch replica of zoo network ``name`` (same fields as
    ``models.get_model(name, num_classes, **model_kwargs)``), in eval mode.

    Raises:
      ValueError: the network has no replica here.
    """
    m = models_lib.get_model(name, num_classes, **model_kwargs)
    if isinstance(m, models_lib.ImageNetResNet):
        net: nn.Module = ResNet(m.stage_sizes, m.block == "bottleneck", num_classes, imagenet=True,
                                width=m.width, base_width=m.width_per_group)
    elif isinstance(m, models_lib.CifarResNet):
        kind = m.block or ("bottleneck" if m.depth >= 44 else "basic")
        n = (m.depth - 2) // 6
        net = ResNet((n, n, n), kind == "bottleneck", num_classes, imagenet=False, width=m.width)
    elif isinstance(m, models_lib.CifarVGG):
        net = VGG(m.cfg, num_classes, batch_norm=m.batch_norm, imagenet=False)
    elif isinstance(m, models_lib.ImageNetVGG):
        net = VGG(m.cfg, num_classes, batch_norm=m.batch_norm, imagenet=True, hidden=m.hidden,
                  dropout=m.dropout_rate)
    else:
        raise ValueError(f"no PyTorch replica of {name!r} ({type(m).__name__})")
    return net.eval()
