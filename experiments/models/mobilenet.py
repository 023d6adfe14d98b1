"""A MobileNet(v1)-style depthwise-separable convnet for small images (NHWC).

``stem: conv3x3(stem_width) -> BN -> relu``, then one depthwise-separable
block per ``(channels, stride)`` of ``blocks``::

    depthwise conv3x3 (feature_group_count = input channels, stride) -> BN -> relu
    pointwise conv1x1 (channels) -> BN -> relu

then global average pooling and a Dense classifier ``fc``. Convs have no bias
(BatchNorm follows each). The depthwise conv reads its channel count from the
input, so a shrunk model (fewer channels) keeps working.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from experiments.models._common import (
    CONV_INIT,
    TORCH_KERNEL_INIT,
    batch_norm,
    conv,
    global_avg_pool,
    torch_bias_init,
)


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 conv (one filter per input channel) then pointwise 1x1 conv."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        channels = x.shape[-1]
        y = nn.Conv(
            channels,
            (3, 3),
            strides=self.stride,
            padding=1,
            feature_group_count=channels,
            use_bias=False,
            kernel_init=CONV_INIT,
            name="dw",
        )(x)
        y = nn.relu(batch_norm(train, "dw_bn")(y))
        y = conv(self.features, 1, 1, "pw")(y)
        return nn.relu(batch_norm(train, "pw_bn")(y))


class MobileNet(nn.Module):
    """Stem conv, depthwise-separable blocks, global average pool, ``fc``.

    Attributes:
      num_classes: outputs of ``fc``.
      stem_width: channels of the stem conv.
      blocks: ``(channels, stride)`` of each depthwise-separable block.
    """

    num_classes: int
    stem_width: int = 16
    blocks: Sequence[tuple[int, int]] = ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.relu(batch_norm(train, "stem_bn")(conv(self.stem_width, 3, 1, "stem")(x)))
        for i, (features, stride) in enumerate(self.blocks):
            x = DepthwiseSeparable(features, stride, name=f"block{i}")(x, train)
        x = global_avg_pool(x)
        return nn.Dense(
            self.num_classes,
            kernel_init=TORCH_KERNEL_INIT,
            bias_init=torch_bias_init(x.shape[-1]),
            name="fc",
        )(x)
