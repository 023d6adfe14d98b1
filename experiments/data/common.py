"""Shared pieces of the data package: errors, normalisation constants and raw-split records."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
from absl import logging


class DataNotFoundError(ValueError):
    """The requested data are not available locally (nothing is ever downloaded)."""


Stats = tuple[tuple[float, ...], tuple[float, ...]]

# Normalisation constants of torchprune's `fixed/parameters_data.yaml`.
MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_MNIST_STATS = MNIST_STATS  # torchprune uses (almost exactly) the MNIST values.
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
CIFAR100_STATS = CIFAR10_STATS  # as in torchprune
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DIGITS_STATS = ((0.3053,), (0.3760,))  # sklearn digits / 16, computed over all 1,797 images

FIXED_SEED = 0  # seed of everything that must not depend on the experiment seed


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a source: its size and a reader of raw examples by index."""

    size: int
    fetch: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def array_split(x: np.ndarray, y: np.ndarray) -> Split:
    """A `Split` over in-memory arrays."""
    if len(x) != len(y):
        raise ValueError(f'{len(x)} images but {len(y)} labels')
    return Split(len(y), lambda idx: (x[idx], y[idx]))


@dataclasses.dataclass(frozen=True)
class Raw:
    """A source before subsetting, splitting and normalisation.

    `scale` maps raw values to [0, 1] (255 for uint8 images); `None` means the images are
    already normalised (synthetic data).
    """

    train: Split
    test: Split
    num_classes: int
    stats: Stats | None
    scale: float | None = 255.0
    variable_shape: bool = False


def normalise(x: np.ndarray, scale: float | None, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """`(x / scale - mean) / std` as float32 (in place on the float copy)."""
    out = np.array(x, dtype=np.float32)
    if scale is None:
        return out
    out *= np.float32(1.0 / scale)
    out -= np.asarray(mean, np.float32)
    out /= np.asarray(std, np.float32)
    return out


def estimate_stats(x: np.ndarray, scale: float | None) -> Stats:
    """Per-channel mean / std of raw images mapped to [0, 1] (for sources without constants)."""
    if scale is None or not len(x):
        channels = x.shape[-1]
        return (0.0,) * channels, (1.0,) * channels
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64) / scale
    mean, std = flat.mean(axis=0), flat.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    logging.info('No normalisation constants known: using train-set mean %s, std %s', mean, std)
    return tuple(mean.tolist()), tuple(std.tolist())


def subset(n: int, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted random subset of `range(n)` of size `limit` (all of it when `limit` is None)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(rng.permutation(n)[:limit])


def split_indices(
    n: int, valid_fraction: float, *, seed: int, max_examples: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, valid) index split of `range(n)`, optionally of a random subset.

    `round(valid_fraction * m)` of the `m = min(n, max_examples)` chosen indices go to
    validation. Both arrays are sorted and disjoint; the result depends only on the args.
    """
    rng = np.random.default_rng(seed)
    chosen = subset(n, max_examples, rng)
    perm = rng.permutation(len(chosen))
    n_valid = int(round(valid_fraction * len(chosen)))
    return np.sort(chosen[perm[n_valid:]]), np.sort(chosen[perm[:n_valid]])


def limit(field: str, value: int | None) -> int | None:
    """`None` or a negative value (config style `-1`) mean no limit; 0 is an error."""
    if value is None or value < 0:
        return None
    if value == 0:
        raise ValueError(f'{field} must be a positive int, or None / -1 for all, got 0')
    return int(value)
