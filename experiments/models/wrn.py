"""Wide ResNets for CIFAR as in bearpaw/pytorch-classification (dropRate 0).

Depth ``6n + 4``, widen factor ``k``: stem conv 3x3 (16), three stages of ``n``
pre-activation wide basic blocks with ``16k, 32k, 64k`` channels (strides
1, 2, 2), final BN-relu, global average pool, ``fc``.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from experiments.models._common import batch_norm, conv, fc_head, has_projection


class WideBasicBlock(nn.Module):
    """Pre-activation block: ``BN-relu-conv3x3(stride)-BN-relu-conv3x3`` + shortcut.

    When the channel count (or stride) changes, the shortcut is a 1x1 conv
    (``downsample``, no BN) applied to the *activated* input ``relu(bn1(x))``,
    as in the reference; otherwise it is the raw input.
    """

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        o = nn.relu(batch_norm(train, "bn1")(x))
        identity = x.shape[-1] == self.features and self.stride == 1
        if not has_projection(self, "downsample", identity):
            shortcut = x
        else:
            shortcut = conv(self.features, 1, self.stride, "downsample")(o)
        y = conv(self.features, 3, self.stride, "conv1")(o)
        y = nn.relu(batch_norm(train, "bn2")(y))
        y = conv(self.features, 3, 1, "conv2")(y)
        return shortcut + y


class WideResNet(nn.Module):
    """bearpaw WideResNet(depth, widen_factor).

    Blocks are named ``layer{stage}_{i}``; stem ``conv1``, final norm ``bn``,
    classifier ``fc`` (PyTorch default weight init, zero bias).
    """

    num_classes: int
    depth: int = 16
    widen_factor: int = 8

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4 with n >= 1, got {self.depth}")
        n = (self.depth - 4) // 6
        x = conv(16, 3, 1, "conv1")(x)
        for stage, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2)), start=1):
            for i in range(n):
                x = WideBasicBlock(
                    16 * mult * self.widen_factor,
                    stride if i == 0 else 1,
                    name=f"layer{stage}_{i}",
                )(x, train)
        x = nn.relu(batch_norm(train, "bn")(x))
        return fc_head(x, self.num_classes, zero_bias=True)
