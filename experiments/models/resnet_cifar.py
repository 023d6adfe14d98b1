"""CIFAR ResNets as in bearpaw/pytorch-classification (the reference's copy).

``resnet20/32/44/56/110``. As in the reference, the number of blocks per stage
is ``n = (depth - 2) // 6`` for both block types and the block type is chosen
by depth: Bottleneck (expansion 4) iff ``depth >= 44``, else BasicBlock. So
``resnet56`` has 3 stages of 9 bottleneck blocks (each 3 convs: 83 conv/fc
layers in all) and ``resnet110`` 3 x 18. Stage widths 16/32/64 (times
``expansion`` at the block outputs); the shortcut is a 1x1 conv + BN (option B)
whenever the stride or the channel count changes.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from experiments.models._common import RESNET_BLOCKS, batch_norm, conv, fc_head


class CifarResNet(nn.Module):
    """bearpaw CIFAR ResNet of depth ``6n + 2``.

    Attributes:
      num_classes: classifier outputs.
      depth: total depth, ``(depth - 2) % 6 == 0``.
      block: ``'basic'``, ``'bottleneck'`` or ``None`` (reference rule:
        bottleneck iff ``depth >= 44``).
      width: channels of the stem and the first stage (16); stages use
        ``width, 2 * width, 4 * width`` planes.
    Blocks are named ``layer{stage}_{i}`` (stage 1..3), the stem ``conv1``/``bn1``,
    the classifier ``fc``. The final 8x8 average pool is a global average pool.
    """

    num_classes: int
    depth: int = 20
    block: str | None = None
    width: int = 16

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1, got {self.depth}")
        kind = self.block or ("bottleneck" if self.depth >= 44 else "basic")
        if kind not in RESNET_BLOCKS:
            raise ValueError(
                f"block must be one of {sorted(RESNET_BLOCKS)} or None, "
                f"got {self.block!r}"
            )
        block_cls = RESNET_BLOCKS[kind]
        n = (self.depth - 2) // 6

        x = conv(self.width, 3, 1, "conv1")(x)
        x = nn.relu(batch_norm(train, "bn1")(x))
        for stage, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2)), start=1):
            for i in range(n):
                x = block_cls(
                    self.width * mult, stride if i == 0 else 1, name=f"layer{stage}_{i}"
                )(x, train)
        return fc_head(x, self.num_classes)
