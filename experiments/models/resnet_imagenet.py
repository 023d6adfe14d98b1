"""ImageNet ResNets with torchvision's definitions (v1.5: stride in the 3x3).

``resnet18/34/50/101`` and ``wide_resnet50_2``; parameter counts equal
torchvision's. Stem ``conv1`` 7x7/2 + ``bn1`` + relu + 3x3/2 max pool, stages
``layer1..layer4`` of 64/128/256/512 planes, global average pool, ``fc``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from experiments.models._common import RESNET_BLOCKS, batch_norm, conv, fc_head


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
        if self.block not in RESNET_BLOCKS:
            raise ValueError(
                f"block must be one of {sorted(RESNET_BLOCKS)}, got {self.block!r}"
            )
        block_cls = RESNET_BLOCKS[self.block]
        x = conv(self.width, 7, 2, "conv1")(x)
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
        return fc_head(x, self.num_classes)
