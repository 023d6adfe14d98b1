"""LeNet family: fully connected LeNet300-100 / LeNet500-300-100 and LeNet5.

Follows the reference (`util/models/fcnet.py`, `util/models/lenet5.py`): ReLU
nets, every layer with a bias, no BatchNorm, PyTorch's default initialisation.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from experiments.models._common import TORCH_KERNEL_INIT, torch_bias_init


class FCNet(nn.Module):
    """Flatten, then ``Dense -> relu`` per hidden width, then ``Dense(num_classes)``.

    Layers are named ``linear0, linear1, ...`` as in the reference.
    """

    num_classes: int
    widths: Sequence[int] = (300, 100)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no BatchNorm / dropout
        x = x.reshape((x.shape[0], -1))
        features = (*self.widths, self.num_classes)
        for i, width in enumerate(features):
            x = nn.Dense(
                width,
                kernel_init=TORCH_KERNEL_INIT,
                bias_init=torch_bias_init(x.shape[-1]),
                name=f"linear{i}",
            )(x)
            if i < len(features) - 1:
                x = nn.relu(x)
        return x


class LeNet5(nn.Module):
    """LeNet5 as in the reference (PyTorch tutorial variant).

    ``conv1 kxk VALID (6) -> relu -> maxpool2 -> conv2 kxk VALID (16) -> relu ->
    maxpool2 -> fc1 -> relu -> fc2 (84) -> relu -> fc3 (num_classes)``.

    ``fc1`` is a VALID convolution whose window covers the whole remaining
    feature map (a reference quirk: it is what the pruning code sees). With the
    reference's 3x3 kernels that window is 6x6 on 32x32 inputs (the reference
    resizes MNIST to 32) and 5x5 on raw 28x28 MNIST, so the parameter count
    depends on the input size. Input channels are taken from the input.
    ``kernel_size=5`` with ``first_padding=2`` gives the classic LeCun layout.
    """

    num_classes: int
    widths: Sequence[int] = (6, 16, 120, 84)
    kernel_size: int = 3
    first_padding: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        c1, c2, f1, f2 = self.widths
        k = (self.kernel_size, self.kernel_size)

        def conv(h, features, window, padding, name):
            fan_in = h.shape[-1] * window[0] * window[1]
            return nn.Conv(
                features,
                window,
                padding=padding,
                kernel_init=TORCH_KERNEL_INIT,
                bias_init=torch_bias_init(fan_in),
                name=name,
            )(h)

        x = nn.relu(conv(x, c1, k, self.first_padding, "conv1"))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(conv(x, c2, k, 0, "conv2"))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(conv(x, f1, tuple(x.shape[1:3]), 0, "fc1"))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(
            f2,
            kernel_init=TORCH_KERNEL_INIT,
            bias_init=torch_bias_init(x.shape[-1]),
            name="fc2",
        )(x)
        x = nn.relu(x)
        return nn.Dense(
            self.num_classes,
            kernel_init=TORCH_KERNEL_INIT,
            bias_init=torch_bias_init(x.shape[-1]),
            name="fc3",
        )(x)
