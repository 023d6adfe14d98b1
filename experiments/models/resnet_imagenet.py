"""ImageNet ResNets with torchvision's definitions (v1.5: stride in the 3x3).

``resnet18/34/50/101`` and ``wide_resnet50_2``; parameter counts equal
torchvision's. Stem ``conv1`` 7x7/2 + ``bn1`` + relu + 3x3/2 max pool, stages
``layer1..layer4`` of 64/128/256/512 planes, global average pool, ``fc``.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import flax.linen as nn
import jax

from experiments.models._common import (
    CONV_INIT,
    TORCH_KERNEL_INIT,
    batch_norm,
    global_avg_pool,
    torch_bias_init,
)


def _conv(features: int, kernel: int, stride: int, name: str) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=stride,
        padding=kernel // 2,  # PyTorch-style symmetric padding
        use_bias=False,
        kernel_init=CONV_INIT,
        name=name,
    )


def _shortcut(x: jax.Array, features: int, stride: int, train: bool) -> jax.Array:
    if stride == 1 and x.shape[-1] == features:
        return x
    y = _conv(features, 1, stride, "downsample_conv")(x)
    return batch_norm(train, "downsample_bn")(y)


class BasicBlock(nn.Module):
    """torchvision BasicBlock (expansion 1)."""

    planes: int
    stride: int = 1
    base_width: int = 64
    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = _conv(self.planes, 3, self.stride, "conv1")(x)
        y = nn.relu(batch_norm(train, "bn1")(y))
        y = _conv(self.planes, 3, 1, "conv2")(y)
        y = batch_norm(train, "bn2")(y)
        return nn.relu(y + _shortcut(x, self.planes, self.stride, train))


class Bottleneck(nn.Module):
    """torchvision Bottleneck (v1.5, expansion 4); inner width ~ ``base_width``."""

    planes: int
    stride: int = 1
    base_width: int = 64
    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        inner = int(self.planes * (self.base_width / 64.0))
        out = self.planes * self.expansion
        y = _conv(inner, 1, 1, "conv1")(x)
        y = nn.relu(batch_norm(train, "bn1")(y))
        y = _conv(inner, 3, self.stride, "conv2")(y)
        y = nn.relu(batch_norm(train, "bn2")(y))
        y = _conv(out, 1, 1, "conv3")(y)
        y = batch_norm(train, "bn3")(y)
        return nn.relu(y + _shortcut(x, out, self.stride, train))


BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ImageNetResNet(nn.Module):
    """torchvision ResNet.

    Attributes:
      num_classes: classifier outputs.
      stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
      block: ``'basic'`` or ``'bottleneck'``.
      width_per_group: bottleneck inner width at 64 planes (128 for WRN-50-2).
      width: stem / first-stage planes (64); stages use ``width * 2**s``.
    """

    num_classes: int
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: str = "basic"
    width_per_group: int = 64
    width: int = 64

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.block not in BLOCKS:
            raise ValueError(
                f"block must be one of {sorted(BLOCKS)}, got {self.block!r}"
            )
        block_cls = BLOCKS[self.block]
        x = _conv(self.width, 7, 2, "conv1")(x)
        x = nn.relu(batch_norm(train, "bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for s, n in enumerate(self.stage_sizes):
            for i in range(n):
                x = block_cls(
                    self.width * 2**s,
                    2 if (s > 0 and i == 0) else 1,
                    self.width_per_group,
                    name=f"layer{s + 1}_{i}",
                )(x, train)
        x = global_avg_pool(x)
        return nn.Dense(
            self.num_classes,
            kernel_init=TORCH_KERNEL_INIT,
            bias_init=torch_bias_init(x.shape[-1]),
            name="fc",
        )(x)
