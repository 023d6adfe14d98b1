"""Model zoo: Flax Linen re-implementations of the reference's networks (NHWC).

Every model is called as ``model.apply(variables, x, train=False)``; with
``train=True`` BatchNorm uses batch statistics and ``batch_stats`` must be
mutable (ImageNet VGGs also need a ``'dropout'`` rng). The only linear layers
are ``nn.Dense`` and ``nn.Conv`` (depthwise in ``mobilenet_small``), plus the
``nn.DenseGeneral`` projections of ``nn.MultiHeadDotProductAttention`` in
``vit_tiny``; each is called once per forward pass.

``get_model(name, num_classes, **kwargs)`` builds a registered network;
``kwargs`` override module fields (e.g. ``widths=`` for the LeNets, ``width=``
for the CIFAR ResNets). ``input_shape(name)`` is the default per-sample input.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn

from experiments.models.densenet import DenseNet
from experiments.models.lenet import FCNet, LeNet5
from experiments.models.mobilenet import MobileNet
from experiments.models.resnet_cifar import CifarResNet
from experiments.models.resnet_imagenet import ImageNetResNet
from experiments.models.vgg import CFGS, DEPTH_TO_CFG, SMALL_CFG, CifarVGG, ImageNetVGG
from experiments.models.vit import ViT
from experiments.models.wrn import WideResNet

__all__ = [
    "CifarResNet",
    "CifarVGG",
    "DenseNet",
    "FCNet",
    "ImageNetResNet",
    "ImageNetVGG",
    "INPUT_SHAPES",
    "LeNet5",
    "MODELS",
    "MODEL_DATASET_FAMILY",
    "MobileNet",
    "ViT",
    "WideResNet",
    "densenet",
    "get_model",
    "input_shape",
    "resnet_cifar",
    "wrn",
]

P = functools.partial


def resnet_cifar(depth: int, block: str | None = None) -> Callable[..., nn.Module]:
    """Factory for a bearpaw CIFAR ResNet of any depth ``6n + 2``."""
    return P(CifarResNet, depth=depth, block=block)


def wrn(depth: int, widen_factor: int) -> Callable[..., nn.Module]:
    """Factory for a bearpaw Wide ResNet ``WRN-depth-widen_factor``."""
    return P(WideResNet, depth=depth, widen_factor=widen_factor)


def densenet(depth: int, growth_rate: int = 12) -> Callable[..., nn.Module]:
    """Factory for a bearpaw DenseNet-BC."""
    return P(DenseNet, depth=depth, growth_rate=growth_rate)


_MNIST: dict[str, Callable[..., nn.Module]] = {
    "lenet300_100": P(FCNet, widths=(300, 100)),
    "lenet500_300_100": P(FCNet, widths=(500, 300, 100)),
    "lenet5": LeNet5,
    # Small modern nets for 28x28x1 inputs (embedded digits, MNIST, Fashion-MNIST).
    "vit_tiny": P(ViT, patch_size=7, hidden_size=64, depth=4, num_heads=4, mlp_dim=128),
    "mobilenet_small": MobileNet,
    "vgg_small_bn": P(CifarVGG, cfg=SMALL_CFG, batch_norm=True),
}

_CIFAR: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}": resnet_cifar(d) for d in (20, 32, 44, 56, 110)},
    **{
        f"vgg{d}{'_bn' if bn else ''}": P(CifarVGG, cfg=CFGS[c], batch_norm=bn)
        for d, c in DEPTH_TO_CFG.items()
        for bn in (False, True)
    },
    "wrn16_8": wrn(16, 8),
    "wrn28_2": wrn(28, 2),
    "wrn28_10": wrn(28, 10),
    "wrn40_1": wrn(40, 1),
    "wrn40_4": wrn(40, 4),
    "densenet22": densenet(22, 12),
    "densenet100": densenet(100, 12),
    "densenet190": densenet(190, 40),
}

_IMAGENET: dict[str, Callable[..., nn.Module]] = {
    "resnet18": P(ImageNetResNet, stage_sizes=(2, 2, 2, 2), block="basic"),
    "resnet34": P(ImageNetResNet, stage_sizes=(3, 4, 6, 3), block="basic"),
    "resnet50": P(ImageNetResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck"),
    "resnet101": P(ImageNetResNet, stage_sizes=(3, 4, 23, 3), block="bottleneck"),
    "wide_resnet50_2": P(
        ImageNetResNet,
        stage_sizes=(3, 4, 6, 3),
        block="bottleneck",
        width_per_group=128,
    ),
    "vgg11_bn_imagenet": P(ImageNetVGG, cfg=CFGS["A"], batch_norm=True),
    "vgg16_bn_imagenet": P(ImageNetVGG, cfg=CFGS["D"], batch_norm=True),
}

MODELS: dict[str, Callable[..., nn.Module]] = {**_MNIST, **_CIFAR, **_IMAGENET}

MODEL_DATASET_FAMILY: dict[str, str] = {
    **{name: "mnist" for name in _MNIST},
    **{name: "cifar" for name in _CIFAR},
    **{name: "imagenet" for name in _IMAGENET},
}

INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "mnist": (28, 28, 1),
    "cifar": (32, 32, 3),
    "imagenet": (224, 224, 3),
}


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise ValueError(
            f"unknown network {name!r}; available: {', '.join(sorted(MODELS))}"
        )


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build the registered network ``name`` with ``num_classes`` outputs."""
    _check_name(name)
    return MODELS[name](num_classes=num_classes, **kwargs)


def input_shape(name: str) -> tuple[int, int, int]:
    """Default per-sample NHWC input shape (H, W, C) of network ``name``."""
    _check_name(name)
    return INPUT_SHAPES[MODEL_DATASET_FAMILY[name]]
