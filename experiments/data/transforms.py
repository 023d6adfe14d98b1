"""Host-side image transforms on uint8 HWC arrays (PIL), as torchvision applies them.

- `eval_transform`: `Resize(resize)` (shorter side) + `CenterCrop(size)`.
- `train_transform`: `RandomResizedCrop(size)` + `RandomHorizontalFlip()`.
- `resize_batch`: `Resize((size, size))` of a stacked NHWC batch.
"""

from __future__ import annotations

import math

import numpy as np


def to_pil(image: np.ndarray):
    """A PIL image of a uint8 HWC (or HW1) array."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    image = np.asarray(image)
    return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)


def pil_to_array(image, channels: int) -> np.ndarray:
    """The uint8 HWC array of a PIL image with `channels` channels."""
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 and channels == 1 else array


def eval_transform(
    image: np.ndarray, image_size: int = 224, resize_size: int | None = None
) -> np.ndarray:
    """torchvision `Resize(resize_size)` (shorter side) + `CenterCrop(image_size)`, uint8 HWC.

    `resize_size` defaults to `round(image_size * 256 / 224)` (256 for 224).
    """
    from PIL import Image  # pylint: disable=import-outside-toplevel

    if resize_size is None:
        resize_size = int(round(image_size * 256 / 224))
    height, width, channels = image.shape
    if height <= width:
        new_h, new_w = resize_size, int(resize_size * width / height)
    else:
        new_h, new_w = int(resize_size * height / width), resize_size
    resized = to_pil(image).resize((new_w, new_h), Image.BILINEAR)
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    cropped = resized.crop((left, top, left + image_size, top + image_size))
    return pil_to_array(cropped, channels)


def random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision `RandomResizedCrop.get_params`: (top, left, h, w) of the crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(
    image: np.ndarray, rng: np.random.Generator, image_size: int = 224
) -> np.ndarray:
    """torchvision `RandomResizedCrop(image_size)` + `RandomHorizontalFlip()`, uint8 HWC."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    height, width, channels = image.shape
    top, left, h, w = random_resized_crop_box(rng, height, width)
    crop = to_pil(image).resize(
        (image_size, image_size), Image.BILINEAR, box=(left, top, left + w, top + h)
    )
    array = pil_to_array(crop, channels)
    return array[:, ::-1] if rng.random() < 0.5 else array


def resize_batch(x: np.ndarray, size: int) -> np.ndarray:
    """Resizes NHWC images to size x size: PIL bilinear for uint8 (as torchvision), else jax."""
    if x.shape[1:3] == (size, size):
        return x
    if x.dtype == np.uint8:
        from PIL import Image  # pylint: disable=import-outside-toplevel

        out = np.empty((len(x), size, size, x.shape[-1]), np.uint8)
        for i, image in enumerate(x):
            out[i] = pil_to_array(to_pil(image).resize((size, size), Image.BILINEAR), x.shape[-1])
        return out
    import jax  # pylint: disable=import-outside-toplevel

    resized = jax.image.resize(x, (len(x), size, size, x.shape[-1]), method='linear')
    return np.asarray(resized, dtype=x.dtype)
