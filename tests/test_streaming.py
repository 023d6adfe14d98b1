"""Streamed data end to end: a tiny variable-size `imagenet2012` prepared here (array_record,
JPEG images, no TensorFlow), the ImageNet config trained / pruned / evaluated on it, and
memory that does not grow with the dataset."""

from __future__ import annotations

import io
import os
import tracemalloc

import numpy as np
import pytest

from experiments import data
from experiments.data import sources, tfds_io


def _jpeg(rng: np.random.Generator, label: int) -> bytes:
    """A small JPEG of random size whose mean colour depends on the label."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    height, width = (int(v) for v in rng.integers(20, 72, 2))
    base = np.array([60 + 40 * label, 200 - 40 * label, 128], np.float32)
    pixels = np.clip(base + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format='JPEG', quality=90)
    return buffer.getvalue()


def prepare_imagenet(data_dir: str, n_train: int, n_valid: int) -> None:
    """Writes a tiny `imagenet2012` (train + validation, 4 of its 1000 classes used) to
    `data_dir` as array_record, with the features of the real tfds builder."""
    from tensorflow_datasets.datasets.imagenet2012 import (  # pylint: disable=import-outside-toplevel
        imagenet2012_dataset_builder as official,
    )

    class TinyImagenet(official.Builder, skip_registration=True):
        name = 'imagenet2012'

        def _split_generators(self, dl_manager):
            del dl_manager
            return {
                'train': self._generate_examples(n_train, 0),
                'validation': self._generate_examples(n_valid, 1),
            }

        def _generate_examples(self, n, seed):  # pylint: disable=arguments-differ
            rng = np.random.default_rng(seed)
            for i in range(n):
                label = i % 4
                name = f'n{label:08d}_{seed}_{i}.JPEG'
                yield name, {'image': _jpeg(rng, label), 'label': label, 'file_name': name}

    TinyImagenet(data_dir=data_dir, file_format='array_record').download_and_prepare()


def test_imagenet_is_streamed_and_missing_data_message(tmp_path, no_network):
    missing = str(tmp_path / 'missing')
    with pytest.raises(data.DataNotFoundError) as info:
        data.load_data(data.DataSpec('tfds:imagenet2012', data_dir=missing), seed=0)
    for part in ('downloads/manual', 'ILSVRC2012_img_train.tar', 'file_format=array_record', missing):
        assert part in str(info.value)

    prepare_imagenet(str(tmp_path / 'tfds'), 10, 5)
    builder = tfds_io.tfds_builder('imagenet2012', str(tmp_path / 'tfds'))
    assert tfds_io.is_streamed(builder)  # variable-size images
    source = data.open_source('tfds:imagenet2012', data_dir=str(tmp_path / 'tfds'))
    assert (len(source.train), len(source.test), source.num_classes) == (10, 5, 1000)
    assert source.mean == data.IMAGENET_STATS[0]
    with pytest.raises(ValueError, match='variable sizes'):
        data.load_dataset('tfds:imagenet2012', data_dir=str(tmp_path / 'tfds'))


def test_imagenet_config_trains_prunes_and_evaluates_streamed(tmp_path, monkeypatch, no_network):
    """configs/imagenet/resnet18.py on the tiny variable-size ImageNet: streamed (the in-memory
    loader is never called), trained, pruned, retrained and evaluated. XLA:CPU compiles
    ResNet18's steps in minutes, so CI swaps in resnet20 (same data path);
    SENSPRUNE_SLOW_TESTS=1 keeps resnet18."""
    from configs import common  # pylint: disable=import-outside-toplevel
    from configs.imagenet import resnet18  # pylint: disable=import-outside-toplevel
    from experiments import pipeline  # pylint: disable=import-outside-toplevel

    data_dir = str(tmp_path / 'tfds')
    prepare_imagenet(data_dir, 40, 12)

    def in_memory(*args, **kwargs):
        raise AssertionError('the in-memory loader was called for a streamed dataset')

    monkeypatch.setattr(sources, 'load_dataset', in_memory)

    config = resnet18.get_config()
    if os.environ.get('SENSPRUNE_SLOW_TESTS') != '1':
        config.network = 'resnet20'
    config.dataset.data_dir = data_dir
    config.dataset.image_size = 32
    for block in (config.training, config.retraining):
        block.update(num_epochs=1, batch_size=8, max_steps_per_epoch=2, lr_milestones=(), warmup=0)
    config.experiments.methods = ('wt',)
    config.experiments.spacing = (common.manual(0.5),)
    config.eval_batch_size = 8
    results = pipeline.run(config, tmp_path / 'run')

    exp = pipeline.build(config, tmp_path / 'run')
    assert exp.dataset.streamed and exp.input_shape == (32, 32, 3)
    assert (exp.dataset.num_train, exp.dataset.num_valid, exp.dataset.num_test) == (36, 4, 12)
    assert results.done.all() and np.isfinite(results.error).all()
    assert (tmp_path / 'run' / 'results.npz').exists()


def _peak_bytes_of_one_epoch(data_dir: str, batch_size: int = 8) -> tuple[int, int]:
    """Peak traced memory of a streamed training epoch and a test pass; examples seen."""
    from experiments import train as train_lib  # pylint: disable=import-outside-toplevel

    spec = data.DataSpec('tfds:imagenet2012', data_dir=data_dir, image_size=32, num_workers=2)
    loaded = data.load_data(spec, seed=0)
    examples, _ = loaded.training('imagenet')
    n = len(examples)
    steps = -(-n // batch_size)
    seen = 0
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        order = train_lib.epoch_order(0, 0, n, steps, batch_size)
        for x, _ in examples.batches(order, seed=0, epoch=0):
            seen += len(x)
        plan = data.padded_index_batches(len(loaded.test), batch_size)
        for x, _ in loaded.test.batches(idx for idx, _ in plan):
            seen += len(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, seen


def test_streaming_memory_does_not_grow_with_the_dataset(tmp_path):
    small, large = str(tmp_path / 'small'), str(tmp_path / 'large')
    prepare_imagenet(small, 32, 8)
    prepare_imagenet(large, 320, 80)
    peak_small, seen_small = _peak_bytes_of_one_epoch(small)
    peak_large, seen_large = _peak_bytes_of_one_epoch(large)
    assert seen_large >= 9 * seen_small  # the large pass really decoded 10x the images
    decoded_large = seen_large * 32 * 32 * 3 * 4  # what holding them all as float32 would take
    assert peak_large < decoded_large / 4
    assert peak_large < 1.5 * peak_small + 256 * 1024, (peak_small, peak_large)
