"""Initialisers and layer helpers shared by the model zoo (PyTorch equivalents)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# Kaiming normal, fan_out, gain sqrt(2): what bearpaw's CIFAR nets and torchvision
# use for convolutions (``normal(0, sqrt(2 / (k * k * out_channels)))``).
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# PyTorch's default Linear/Conv weight init, ``kaiming_uniform(a=sqrt(5))``,
# i.e. ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# torchvision / bearpaw VGG classifier init.
VGG_LINEAR_INIT = nn.initializers.normal(stddev=0.01)


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default bias init ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults (momentum 0.1 there = 0.9 here, eps 1e-5)."""
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name
    )


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes of an NHWC map -> ``[B, C]``."""
    return jnp.mean(x, axis=(1, 2))
