"""`load_data`: a dataset config in, train / valid / test `Examples` and metadata out.

Small sources are loaded into memory (`sources.load_dataset`, `ArrayExamples`); tfds
datasets with variable-size images or too large for memory (ImageNet) are streamed
(`StreamedExamples` over array_record records). The choice follows from the source
(`tfds_io.is_streamed`); nothing is downloaded either way.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import numpy as np
from absl import logging

from experiments.data import batching, common, sources, tfds_io
from experiments.data.streaming import StreamedExamples

# Training augmentations that streamed data apply on the host, on the full-size decoded
# image (torchvision order), instead of on the device batch.
HOST_AUGMENTATIONS = ('imagenet',)
STREAMED_IMAGE_SIZE = 224


def _unset(value: Any) -> Any:
    """Configs use '' and -1 for "not set" (ConfigDict fields keep one type)."""
    return None if value in ('', -1, None) else value


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What to load (the fields of a config's `dataset` block).

    Attributes:
      name: a source name (see `experiments.data.sources`).
      data_dir: where its files are; None: the source's default.
      valid_fraction: fraction of the training split held out for validation and S.
      max_train / max_test: caps on the examples used (None: all).
      image_size: square input size; None: the native size (in memory) or 224 (streamed).
      num_workers: decoding threads of streamed data (runtime only, not in configs).
    """

    name: str
    data_dir: Optional[str] = None
    valid_fraction: float = 0.1
    max_train: Optional[int] = None
    max_test: Optional[int] = None
    image_size: Optional[int] = None
    num_workers: int = dataclasses.field(default_factory=lambda: min(8, os.cpu_count() or 1))

    @classmethod
    def from_config(cls, cfg: Any) -> 'DataSpec':
        """The spec of a config's `dataset` block ('' / -1 mean unset; missing fields: defaults)."""
        get = cfg.get if hasattr(cfg, 'get') else lambda k, d=None: getattr(cfg, k, d)
        return cls(
            name=get('name'),
            data_dir=_unset(get('data_dir', '')),
            valid_fraction=float(get('valid_fraction', 0.1)),
            max_train=_unset(get('max_train', -1)),
            max_test=_unset(get('max_test', -1)),
            image_size=_unset(get('image_size', -1)),
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Data:
    """Train / valid / test examples of one dataset and what the model needs to know."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    train: batching.Examples
    valid: batching.Examples
    test: batching.Examples
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    streamed: bool = False

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_valid(self) -> int:
        return len(self.valid)

    @property
    def num_test(self) -> int:
        return len(self.test)

    def training(self, augment: str) -> tuple[batching.Examples, Optional[Callable[..., Any]]]:
        """The examples to train on with the config's `augment`, and the device augmentation
        that replaces the config's (None: keep it).

        Streamed data apply `HOST_AUGMENTATIONS` while decoding (random-resized crop of the
        full image), so the device step gets the identity instead.
        """
        if not (self.streamed and augment in HOST_AUGMENTATIONS):
            return self.train, None
        from experiments import augment as augment_lib  # pylint: disable=import-outside-toplevel

        return dataclasses.replace(self.train, augment=True), augment_lib.identity

    def __repr__(self) -> str:
        kind = 'streamed' if self.streamed else 'in memory'
        return (
            f'Data({self.name!r}, {kind}, num_classes={self.num_classes}, '
            f'input_shape={self.input_shape}, train={self.num_train}, '
            f'valid={self.num_valid}, test={self.num_test})'
        )


def from_dataset(dataset: sources.Dataset) -> Data:
    """`Data` over the arrays of an in-memory `Dataset`."""
    return Data(
        name=dataset.name,
        num_classes=dataset.num_classes,
        input_shape=dataset.input_shape,
        train=batching.ArrayExamples(dataset.train_x, dataset.train_y),
        valid=batching.ArrayExamples(dataset.valid_x, dataset.valid_y),
        test=batching.ArrayExamples(dataset.test_x, dataset.test_y),
        mean=dataset.mean,
        std=dataset.std,
    )


def load_data(spec: DataSpec, *, seed: int) -> Data:
    """Loads (small) or opens for streaming (large, variable-size) the dataset of `spec`.

    `seed` picks the `max_train` subset and the validation split, as in `load_dataset`.

    Raises:
      DataNotFoundError: the data are not prepared locally (says what to prepare, where).
      ValueError: a bad name or field.
    """
    if not 0.0 <= spec.valid_fraction < 1.0:
        raise ValueError(f'valid_fraction must be in [0, 1), got {spec.valid_fraction}')
    if spec.image_size is not None and spec.image_size < 1:
        raise ValueError(f'image_size must be a positive int or None, got {spec.image_size}')
    if tfds_io.name_is_streamed(spec.name, spec.data_dir):
        data = _streamed(spec, seed)
    else:
        data = from_dataset(sources.load_dataset(
            spec.name, data_dir=spec.data_dir, valid_fraction=spec.valid_fraction, seed=seed,
            max_train=spec.max_train, max_test=spec.max_test, image_size=spec.image_size,
        ))
    logging.info('Data: %r', data)
    return data


def _streamed(spec: DataSpec, seed: int) -> Data:
    """`Data` streaming the records of a prepared tfds dataset."""
    source = tfds_io.open_source(spec.name, data_dir=spec.data_dir)
    max_train = common.limit('max_train', spec.max_train)
    max_test = common.limit('max_test', spec.max_test)
    train_idx, valid_idx = common.split_indices(
        len(source.train), spec.valid_fraction, seed=seed, max_examples=max_train
    )
    test_idx = common.subset(len(source.test), max_test, np.random.default_rng(common.FIXED_SEED))
    size = spec.image_size or STREAMED_IMAGE_SIZE

    def split(records, indices: np.ndarray) -> StreamedExamples:
        return StreamedExamples(
            records=records, indices=indices, image_size=size, mean=source.mean, std=source.std,
            image_key=source.image_key, label_key=source.label_key, num_workers=spec.num_workers,
        )

    return Data(
        name=source.name,
        num_classes=source.num_classes,
        input_shape=(size, size, source.channels),
        train=split(source.train, train_idx),
        valid=split(source.train, valid_idx),
        test=split(source.test, test_idx),
        mean=source.mean,
        std=source.std,
        streamed=True,
    )


def sample_set(examples: batching.Examples, size: int, seed: int) -> batching.Batch:
    """The sensitivity set S: `size` examples (with labels) drawn without replacement.

    Drawn from the validation split; if `size` exceeds it, all of it (with a warning).
    """
    n = len(examples)
    if n == 0:
        raise ValueError(
            'the validation split is empty; S is drawn from it, so load the dataset with '
            'valid_fraction > 0.'
        )
    if size < 1:
        raise ValueError(f'size of S must be >= 1, got {size}')
    if size > n:
        logging.warning(
            'Requested |S| = %d but the validation split has only %d images: using all of them.',
            size, n,
        )
        size = n
    picks = np.random.default_rng(seed).choice(n, size=size, replace=False)
    return examples.take(picks)
