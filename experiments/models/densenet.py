"""DenseNet-BC for CIFAR as in bearpaw/pytorch-classification (dropRate 0).

Stem conv 3x3 with ``2 * growth_rate`` channels (no BN after it), three dense
blocks separated by transitions (BN-relu-conv1x1-avgpool2, channels divided by
``compression_rate``), final BN-relu, global average pool, ``fc``. Each
bottleneck layer is ``BN-relu-conv1x1(4k)-BN-relu-conv3x3(k)`` and its output is
concatenated to its input. Layers per block: ``(depth - 4) // 6`` with
bottlenecks, ``(depth - 4) // 3`` without.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models._common import batch_norm, conv, fc_head


class DenseLayer(nn.Module):
    """One dense layer; returns ``concat([x, new_features], axis=-1)``."""

    growth_rate: int
    bottleneck: bool = True
    expansion: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = nn.relu(batch_norm(train, "bn1")(x))
        if self.bottleneck:
            y = conv(self.expansion * self.growth_rate, 1, 1, "conv1")(y)
            y = nn.relu(batch_norm(train, "bn2")(y))
            y = conv(self.growth_rate, 3, 1, "conv2")(y)
        else:
            y = conv(self.growth_rate, 3, 1, "conv1")(y)
        return jnp.concatenate([x, y], axis=-1)


class Transition(nn.Module):
    """BN-relu-conv1x1-avgpool2."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = nn.relu(batch_norm(train, "bn1")(x))
        y = conv(self.features, 1, 1, "conv1")(y)
        return nn.avg_pool(y, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
    """bearpaw DenseNet. Blocks ``dense{b}_{i}``, transitions ``trans{b}``,
    stem ``conv1``, final norm ``bn``, classifier ``fc``."""

    num_classes: int
    depth: int = 22
    growth_rate: int = 12
    compression_rate: int = 2
    bottleneck: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        n = (self.depth - 4) // (6 if self.bottleneck else 3)
        if (self.depth - 4) % 3 or n < 1:
            raise ValueError(
                "depth must be 3n+4 with at least one layer per block, "
                f"got {self.depth}"
            )
        channels = 2 * self.growth_rate
        x = conv(channels, 3, 1, "conv1")(x)
        for b in range(1, 4):
            for i in range(n):
                x = DenseLayer(self.growth_rate, self.bottleneck, name=f"dense{b}_{i}")(
                    x, train
                )
                channels += self.growth_rate
            if b < 3:
                channels = channels // self.compression_rate
                x = Transition(channels, name=f"trans{b}")(x, train)
        x = nn.relu(batch_norm(train, "bn")(x))
        return fc_head(x, self.num_classes)
