"""VGG for CIFAR (bearpaw) and ImageNet (torchvision, with the reference's fc6-as-conv).

Feature extractor: per cfg entry a ``conv3x3 pad 1 (with bias) [-> BN] -> relu``
or ``'M'`` = 2x2 max pool. Convs are named ``conv{i}``/``bn{i}`` (i counts convs).

* ``CifarVGG``: features, flatten of the 1x1x512 map, one ``Dense(num_classes)``
  named ``classifier`` (bearpaw's CIFAR VGG).
* ``ImageNetVGG``: features, adaptive average pool to 7x7, ``fc6`` = 7x7 VALID
  conv with 4096 outputs (the reference's ``VGGWrapper`` turns torchvision's first
  Linear into this equivalent conv so filter pruning propagates across the
  flatten; same parameter count), relu, dropout, ``fc7`` Dense 4096, relu,
  dropout, ``fc8`` Dense(num_classes). ``train=True`` with ``dropout_rate > 0``
  needs a ``'dropout'`` rng.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models._common import CONV_INIT, VGG_LINEAR_INIT
from experiments.models._common import batch_norm as bn_layer

CFGS: dict[str, tuple[int | str, ...]] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "B": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
          512, 512, 512, "M", 512, 512, 512, "M"),
    "E": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
          512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}  # fmt: skip
DEPTH_TO_CFG = {11: "A", 13: "B", 16: "D", 19: "E"}
# Reduced widths for 28x28 inputs (Fashion-MNIST): four pools take 28 -> 1, 8 convs, about 1.2M params.
SMALL_CFG: tuple[int | str, ...] = (32, 32, "M", 64, 64, "M", 128, 128, "M", 256, 256, "M")


def _features(
    x: jax.Array, cfg: Sequence[int | str], use_bn: bool, train: bool
) -> jax.Array:
    """Apply the VGG feature extractor (called inside a compact method)."""
    i = 0
    for v in cfg:
        if v == "M":
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            continue
        padding: int | str = 1
        if min(x.shape[1:3]) <= 2:
            # XLA:CPU runs a padded conv on a 1-2 pixel map ~30x slower than the same conv on an
            # input padded beforehand; the barrier keeps XLA from folding the pad back into the conv.
            x = jax.lax.optimization_barrier(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))))
            padding = "VALID"
        x = nn.Conv(
            int(v),
            (3, 3),
            padding=padding,
            kernel_init=CONV_INIT,
            bias_init=nn.initializers.zeros,
            name=f"conv{i}",
        )(x)
        if use_bn:
            x = bn_layer(train, f"bn{i}")(x)
        x = nn.relu(x)
        i += 1
    return x


def _dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        kernel_init=VGG_LINEAR_INIT,
        bias_init=nn.initializers.zeros,
        name=name,
    )


class CifarVGG(nn.Module):
    """bearpaw CIFAR VGG: features + a single linear classifier."""

    num_classes: int
    cfg: Sequence[int | str] = CFGS["D"]
    batch_norm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = _features(x, self.cfg, self.batch_norm, train)
        x = x.reshape((x.shape[0], -1))
        return _dense(self.num_classes, "classifier")(x)


def _adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
    """``AdaptiveAvgPool2d(size)`` for maps whose sides are multiples of ``size``."""
    h, w = x.shape[1:3]
    if h % size or w % size:
        raise ValueError(
            f"feature map {h}x{w} is not a multiple of {size}x{size}; "
            "use inputs of 224 x 224 (or multiples of 224)"
        )
    if (h, w) == (size, size):
        return x
    b, c = x.shape[0], x.shape[-1]
    return jnp.mean(x.reshape(b, size, h // size, size, w // size, c), axis=(2, 4))


class ImageNetVGG(nn.Module):
    """torchvision VGG; ``fc6`` is the equivalent 7x7 conv (reference VGGWrapper)."""

    num_classes: int
    cfg: Sequence[int | str] = CFGS["D"]
    batch_norm: bool = True
    hidden: int = 4096
    dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = _features(x, self.cfg, self.batch_norm, train)
        x = _adaptive_avg_pool(x, 7)
        x = nn.Conv(
            self.hidden,
            (7, 7),
            padding="VALID",
            kernel_init=VGG_LINEAR_INIT,
            bias_init=nn.initializers.zeros,
            name="fc6",
        )(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.relu(_dense(self.hidden, "fc7")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return _dense(self.num_classes, "fc8")(x)
