"""tensorflow-datasets sources, always `download=False`.

Prepared array_record data are read without TensorFlow (random access: in memory for small
datasets, streamed for large ones); tfrecord data only when TensorFlow is importable (in
memory, fixed-size images only). `TfdsSource` describes a prepared dataset: its record
sequences, keys, classes, normalisation and whether it has to be streamed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging

from experiments.data import common
from experiments.data.common import DataNotFoundError

STATS = {
    'mnist': common.MNIST_STATS,
    'fashion_mnist': common.FASHION_MNIST_STATS,
    'cifar10': common.CIFAR10_STATS,
    'cifar100': common.CIFAR100_STATS,
    'imagenet2012': common.IMAGENET_STATS,
    'imagenet2012_subset': common.IMAGENET_STATS,
    'imagenet_v2': common.IMAGENET_STATS,
    'imagenette': common.IMAGENET_STATS,
}
# Native names that are also tfds names: a tfds data_dir holding them works too.
NATIVE = ('mnist', 'fashion_mnist', 'cifar10', 'cifar100')
_NAME = re.compile(r'^[a-z0-9_]+(/[\w.-]+)?(:[\d*]+\.[\d*]+\.[\d*]+)?$')
# Fixed-size datasets whose decoded float32 images (train + test) need more than this stream.
STREAM_ABOVE_BYTES = 4 * 2**30


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
    """Random-access records of a prepared tfds dataset (train and test/validation split).

    `train` / `test` are sequences (tfds array_record data sources) whose items are mappings
    with a uint8 HxWxC image under `image_key` (decoded from its JPEG/PNG bytes when the item
    is read) and an int label under `label_key`. `streamed`: too large for memory, or images
    of variable size, so batches are decoded on the fly (`experiments.data.streaming`).
    """

    name: str
    train: Sequence[Mapping[str, Any]] = dataclasses.field(repr=False)
    test: Sequence[Mapping[str, Any]] = dataclasses.field(repr=False)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_key: str = 'image'
    label_key: str = 'label'
    channels: int = 3
    streamed: bool = True


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
        import tensorflow  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        return False
    return True


def tfds_builder(tfds_name: str, data_dir: str | None):
    """The prepared tfds builder for `tfds_name`; never downloads, never asks GCS."""
    if not _NAME.match(tfds_name):
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
    base = base_name(tfds_name)
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


# Datasets whose `test` split has no labels: evaluate on `validation` (as torchprune does).
_UNLABELED_TEST = ('imagenet2012', 'imagenet2012_subset')


def _tfds_splits(builder) -> tuple[str, str]:
    """The (train, eval) split names: eval is `test` if labelled, else `validation`."""
    splits = set(builder.info.splits.keys())
    order = ('validation',) if builder.name in _UNLABELED_TEST else ('test', 'validation')
    test = next((s for s in order if s in splits), None)
    if 'train' not in splits or test is None:
        raise ValueError(
            f'tfds:{builder.name}: need a train and a {"/".join(order)} split, have {sorted(splits)}'
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
    """Opens `tfds:<name>` (prepared as array_record) for random access."""
    tfds_name = name[len('tfds:'):] if name.startswith('tfds:') else name
    return _source_from_builder(tfds_builder(tfds_name, data_dir), tfds_name)


def is_streamed(builder) -> bool:
    """Whether a prepared dataset is streamed: images of variable size, or decoded float32
    images (all splits) of more than `STREAM_ABOVE_BYTES`."""
    image_key, _ = _tfds_keys(builder)
    shape = builder.info.features[image_key].shape
    if any(d is None for d in shape):
        return True
    examples = sum(int(split.num_examples) for split in builder.info.splits.values())
    return examples * int(np.prod(shape)) * 4 > STREAM_ABOVE_BYTES


def name_is_streamed(name: str, data_dir: str | None) -> bool:
    """`is_streamed` for a dataset name (False for every source that is not `tfds:`)."""
    if not name.startswith('tfds:'):
        return False
    return is_streamed(tfds_builder(name[len('tfds:'):], data_dir))


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
    stats = STATS.get(base_name(tfds_name))
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
        channels=int(builder.info.features[image_key].shape[-1] or 3),
        streamed=is_streamed(builder),
    )


def base_name(tfds_name: str) -> str:
    """`imagenet2012/config:5.1.0` -> `imagenet2012`."""
    return tfds_name.split('/')[0].split(':')[0]


def _estimate_source_stats(records: Sequence[Mapping[str, Any]], image_key: str, count: int = 64):
    """Per-channel stats of the first `count` records (for datasets without known constants)."""
    pixels = []
    for i in range(min(count, len(records))):
        image = np.asarray(records[i][image_key], dtype=np.uint8)
        pixels.append(image.reshape(-1, image.shape[-1] if image.ndim == 3 else 1))
    return common.estimate_stats(np.concatenate(pixels)[None, None], 255.0)


def _records_split(
    records: Sequence[Mapping[str, Any]], image_key: str, label_key: str
) -> common.Split:
    """A `Split` decoding fixed-size records on demand."""

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
                images.append(image)
                labels.append(int(record[label_key]))
        if not images:
            return np.zeros((0, 1, 1, 1), np.uint8), np.zeros((0,), np.int32)
        return np.stack(images), np.asarray(labels, np.int32)

    return common.Split(len(records), fetch)


def tfds_raw(tfds_name: str, data_dir: str | None) -> common.Raw:
    """A fixed-size tfds dataset for memory: array_record without TF, else `tfds.load` with TF."""
    builder = tfds_builder(tfds_name, data_dir)
    image_key, label_key = _tfds_keys(builder)
    variable = any(d is None for d in builder.info.features[image_key].shape)
    fields = dict(
        num_classes=_tfds_num_classes(builder, label_key),
        stats=STATS.get(base_name(tfds_name)),
        variable_shape=variable,
    )
    if _random_access(builder):
        source = _source_from_builder(builder, tfds_name)
        return common.Raw(
            train=_records_split(source.train, image_key, label_key),
            test=_records_split(source.test, image_key, label_key),
            **fields,
        )
    if not _tensorflow_available():
        raise DataNotFoundError(
            f'tfds:{tfds_name}: prepared in {builder.info.file_format} format under '
            f'{builder.data_dir}, which needs TensorFlow to read (pip install tensorflow-cpu), '
            f'or re-prepare it as array_record: `tfds build {base_name(tfds_name)} '
            '--data_dir=DIR --file_format=array_record`.'
        )
    if variable:
        raise ValueError(
            f'tfds:{tfds_name}: variable-size images in tfrecord format cannot be loaded into '
            'memory; convert to array_record (`tfds convert_format`) so that load_data() '
            'streams them.'
        )
    train_split, test_split = _tfds_splits(builder)
    return common.Raw(
        train=_tfds_tf_split(builder, tfds_name, train_split, data_dir, image_key, label_key),
        test=_tfds_tf_split(builder, tfds_name, test_split, data_dir, image_key, label_key),
        **fields,
    )


def _tfds_tf_split(
    builder, tfds_name: str, split: str, data_dir: str | None, image_key: str, label_key: str
) -> common.Split:
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
    return common.array_split(images, np.asarray(data[label_key], dtype=np.int32))

