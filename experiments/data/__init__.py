"""Data for the experiments: offline sources, in memory or streamed, and batching.

`load_data(DataSpec.from_config(config.dataset), seed=...)` is the one entry point of the
pipeline: it returns a `Data` with train / valid / test `Examples` (see `batching`) and the
metadata the model needs. Small sources (MNIST, digits, CIFAR, synthetic, small tfds sets)
are held in memory (`sources`); tfds datasets with variable-size images or too large for
memory (ImageNet) are streamed from their array_record files (`streaming`). Nothing is ever
downloaded: missing data raise `DataNotFoundError` saying what to prepare, and where.

Modules: `common` (errors, constants, splits), `sources` (in-memory readers), `tfds_io`
(tensorflow-datasets), `transforms` (host-side image transforms), `batching` (the batching
path), `streaming` (streamed examples), `loader` (`load_data`).
"""

from experiments.data.batching import ArrayExamples, Batch, Examples, as_examples, padded_index_batches, prefetch
from experiments.data.common import (
    CIFAR10_STATS,
    CIFAR100_STATS,
    DIGITS_STATS,
    FASHION_MNIST_STATS,
    IMAGENET_STATS,
    MNIST_STATS,
    DataNotFoundError,
    split_indices,
)
from experiments.data.loader import Data, DataSpec, from_dataset, load_data, sample_set
from experiments.data.sources import (
    DATASET_NAMES,
    DATASET_PREFIXES,
    FASHION_MNIST_DEFAULT_DIR,
    Dataset,
    load_dataset,
    read_cifar_batch,
    read_idx,
)
from experiments.data.streaming import StreamedExamples
from experiments.data.tfds_io import Source, open_source
from experiments.data.transforms import eval_transform, random_resized_crop_box, train_transform

__all__ = [
    'ArrayExamples',
    'as_examples',
    'Batch',
    'CIFAR100_STATS',
    'CIFAR10_STATS',
    'Data',
    'DataNotFoundError',
    'DataSpec',
    'DATASET_NAMES',
    'DATASET_PREFIXES',
    'Dataset',
    'DIGITS_STATS',
    'eval_transform',
    'Examples',
    'FASHION_MNIST_DEFAULT_DIR',
    'FASHION_MNIST_STATS',
    'from_dataset',
    'IMAGENET_STATS',
    'load_data',
    'load_dataset',
    'MNIST_STATS',
    'open_source',
    'padded_index_batches',
    'prefetch',
    'random_resized_crop_box',
    'read_cifar_batch',
    'read_idx',
    'sample_set',
    'Source',
    'split_indices',
    'StreamedExamples',
    'train_transform',
]
