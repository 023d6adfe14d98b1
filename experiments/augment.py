"""Jit-friendly data augmentation of device batches (NHWC) with an explicit `jax.random` key.

Every function has the signature `fn(key, x) -> x'` once its options are bound, keeps static
shapes, is jitted (options static), and draws per-example randomness from `key`.

Reference transforms (torchvision, applied by torchprune *before* `Normalize`):
- CIFAR: `Pad(4)`, `RandomCrop(32)`, `RandomHorizontalFlip()` -> `pad_crop_flip`.
- MNIST LeNet5: `Resize(32)`, `Pad(4)`, `RandomCrop(32)` -> `pad_crop` (resize at load time,
  `load_dataset(..., image_size=32)`).
- ImageNet: `RandomResizedCrop(224)`, `RandomHorizontalFlip()` -> `random_resized_crop_flip`.

Padding: torchvision pads the raw image with black (0) before normalisation, i.e. with
`-mean / std` in normalised units. Our batches are already normalised and the default
`fill=0.0` pads with the dataset mean instead; pass `fill=reference_fill(mean, std)` for the
exact reference behaviour.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

__all__ = [
    'AugmentFn',
    'AUGMENTATIONS',
    'get_augmentation',
    'identity',
    'pad_crop',
    'pad_crop_flip',
    'pad_crop_params',
    'random_resized_crop_flip',
    'random_resized_crop_params',
    'reference_fill',
]

AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]


def reference_fill(mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """Per-channel value of a black raw pixel after normalisation: `-mean / std`."""
    return -jnp.asarray(mean, jnp.float32) / jnp.asarray(std, jnp.float32)


def identity(key: jax.Array, x: jax.Array) -> jax.Array:
    """No augmentation."""
    del key
    return x


# ----------------------------------------------------------------------------- pad / crop / flip


@functools.partial(jax.jit, static_argnames=('batch', 'pad'))
def pad_crop_params(key: jax.Array, batch: int, pad: int) -> tuple[jax.Array, jax.Array]:
    """Per-example crop offsets `[B, 2]` (row, col in `[0, 2*pad]`) and flip flags `[B]`."""
    offset_key, flip_key = jax.random.split(key)
    # Flat draws reshaped: XLA:CPU compiles 2-D threefry shapes far more slowly.
    offsets = jax.random.randint(offset_key, (2 * batch,), 0, 2 * pad + 1, dtype=jnp.int32)
    offsets = offsets.reshape(batch, 2)
    flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
    return offsets, flips


def _pad_crop_one(
    image: jax.Array, offset: jax.Array, flip: jax.Array, pad: int, fill
) -> jax.Array:
    height, width, channels = image.shape
    canvas = jnp.broadcast_to(
        jnp.asarray(fill, image.dtype), (height + 2 * pad, width + 2 * pad, channels)
    )
    canvas = jax.lax.dynamic_update_slice(canvas, image, (pad, pad, 0))
    crop = jax.lax.dynamic_slice(canvas, (offset[0], offset[1], 0), (height, width, channels))
    return jnp.where(flip, crop[:, ::-1], crop)


@functools.partial(jax.jit, static_argnames=('pad', 'flip'))
def pad_crop_flip(
    key: jax.Array, x: jax.Array, pad: int = 4, *, fill=0.0, flip: bool = True
) -> jax.Array:
    """Pads each image by `pad` with `fill`, crops back to its size at a random offset, flips.

    Args:
      key: PRNG key; the same key gives the same result.
      x: `[B, H, W, C]` batch.
      pad: padding on each side (torchvision `Pad(pad)` + `RandomCrop(H)`).
      fill: scalar or per-channel `[C]` padding value (see `reference_fill`).
      flip: also flip horizontally with probability 1/2 (`RandomHorizontalFlip`).
    """
    offsets, flips = pad_crop_params(key, batch=x.shape[0], pad=pad)
    if not flip:
        flips = jnp.zeros_like(flips)
    return jax.vmap(functools.partial(_pad_crop_one, pad=pad, fill=fill))(x, offsets, flips)


@functools.partial(jax.jit, static_argnames=('pad',))
def pad_crop(key: jax.Array, x: jax.Array, pad: int = 4, *, fill=0.0) -> jax.Array:
    """`pad_crop_flip` without the flip (MNIST LeNet5 reference augmentation)."""
    return pad_crop_flip(key, x, pad=pad, fill=fill, flip=False)


# ----------------------------------------------------------------------------- random resized crop


@functools.partial(
    jax.jit, static_argnames=('batch', 'height', 'width', 'scale', 'ratio', 'attempts')
)
def random_resized_crop_params(
    key: jax.Array,
    *,
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[jax.Array, jax.Array]:
    """Crop boxes `[B, 4]` (top, left, h, w; float32 integers) and flip flags `[B]`.

    torchvision's `RandomResizedCrop.get_params`, vectorised: `attempts` candidates are drawn
    at once and the first that fits is taken, else the central crop with the ratio clamped.
    """
    area_key, ratio_key, top_key, left_key, flip_key = jax.random.split(key, 5)
    flat = (batch * attempts,)  # flat draws: XLA:CPU compiles 2-D threefry shapes slowly
    area = jax.random.uniform(area_key, flat, minval=scale[0], maxval=scale[1])
    target = height * width * area.reshape(batch, attempts)
    log_ratio = jax.random.uniform(
        ratio_key, flat, minval=math.log(ratio[0]), maxval=math.log(ratio[1])
    ).reshape(batch, attempts)
    aspect = jnp.exp(log_ratio)
    w = jnp.round(jnp.sqrt(target * aspect))
    h = jnp.round(jnp.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(fits, axis=1)
    found = jnp.any(fits, axis=1)

    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = round(height * ratio[1]), height
    else:
        fallback_w, fallback_h = width, height
    pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]  # noqa: E731
    h = jnp.where(found, pick(h), fallback_h)
    w = jnp.where(found, pick(w), fallback_w)
    top = jnp.floor(jax.random.uniform(top_key, (batch,)) * (height - h + 1))
    left = jnp.floor(jax.random.uniform(left_key, (batch,)) * (width - w + 1))
    top = jnp.where(found, top, (height - h) // 2)
    left = jnp.where(found, left, (width - w) // 2)
    boxes = jnp.stack([top, left, h, w], axis=1).astype(jnp.float32)
    return boxes, jax.random.bernoulli(flip_key, 0.5, (batch,))


def _crop_resize_one(image: jax.Array, box: jax.Array, flip: jax.Array, size: int) -> jax.Array:
    """Bilinear (antialiased) resample of the box `(top, left, h, w)` to `size x size`."""
    top, left, h, w = box[0], box[1], box[2], box[3]
    scale = jnp.stack([size / h, size / w])
    translation = jnp.stack([-top * size / h, -left * size / w])
    out = jax.image.scale_and_translate(
        image, (size, size, image.shape[-1]), (0, 1), scale, translation, method='linear'
    )
    return jnp.where(flip, out[:, ::-1], out).astype(image.dtype)


@functools.partial(jax.jit, static_argnames=('size', 'scale', 'ratio'))
def random_resized_crop_flip(
    key: jax.Array,
    x: jax.Array,
    size: int = 224,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> jax.Array:
    """torchvision `RandomResizedCrop(size)` + `RandomHorizontalFlip()` on a `[B, H, W, C]` batch.

    The output is `[B, size, size, C]` (static); crops are resampled bilinearly with
    antialiasing (`jax.image.scale_and_translate`).
    """
    batch, height, width, _ = x.shape
    boxes, flips = random_resized_crop_params(
        key, batch=batch, height=height, width=width, scale=scale, ratio=ratio
    )
    return jax.vmap(functools.partial(_crop_resize_one, size=size))(x, boxes, flips)


# ----------------------------------------------------------------------------- registry


AUGMENTATIONS: dict[str, AugmentFn] = {
    'none': identity,
    'cifar': pad_crop_flip,
    'pad_crop': pad_crop,
    'imagenet': functools.partial(random_resized_crop_flip, size=224),
}


def get_augmentation(name: str, **kwargs) -> AugmentFn:
    """The augmentation `name` of `AUGMENTATIONS`, with keyword options bound (e.g. `fill`)."""
    if name not in AUGMENTATIONS:
        raise ValueError(f'Unknown augmentation {name!r}; allowed: {", ".join(AUGMENTATIONS)}')
    fn = AUGMENTATIONS[name]
    if not kwargs or fn is identity:
        return fn
    return functools.partial(fn, **kwargs)
