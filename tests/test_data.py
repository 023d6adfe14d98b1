"""Tests of experiments.data and experiments.augment (offline, small files written here)."""

from __future__ import annotations

import gzip
import itertools
import logging
import os
import pickle
import struct
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import augment, data

# ----------------------------------------------------------------------------- helpers


def _idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype('>i4'): 0x0C, np.dtype('>f4'): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    return header + struct.pack(f'>{array.ndim}i', *array.shape) + array.tobytes()


def _write_idx(path: str, array: np.ndarray, gz: bool) -> None:
    payload = _idx_bytes(array)
    if gz:
        with gzip.open(path + '.gz', 'wb') as f:
            f.write(payload)
    else:
        with open(path, 'wb') as f:
            f.write(payload)


def _write_mnist_dir(directory: str, gz: bool, n_train=50, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    arrays = {
        'train-images-idx3-ubyte': rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        'train-labels-idx1-ubyte': (np.arange(n_train) % 10).astype(np.uint8),
        't10k-images-idx3-ubyte': rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        't10k-labels-idx1-ubyte': (np.arange(n_test) % 10).astype(np.uint8),
    }
    for name, array in arrays.items():
        _write_idx(os.path.join(directory, name), array, gz)
    return arrays


def _cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b'batch_label': b'batch',
        b'labels': [int(v) for v in rng.integers(0, 10, n)],
        b'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b'filenames': [b'f'] * n,
    }


def _write_cifar_dir(root: str, n_per_batch=8):
    directory = os.path.join(root, 'cifar-10-batches-py')
    os.makedirs(directory)
    batches = {}
    for i, name in enumerate([f'data_batch_{k}' for k in range(1, 6)] + ['test_batch']):
        batches[name] = _cifar_batch(n_per_batch, i)
        with open(os.path.join(directory, name), 'wb') as f:
            pickle.dump(batches[name], f, protocol=2)
    return batches


def _rows(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in x}


# ----------------------------------------------------------------------------- readers


@pytest.mark.parametrize('gz', [True, False])
def test_idx_reader_and_mnist_loader(tmp_path, gz):
    arrays = _write_mnist_dir(str(tmp_path), gz)
    suffix = '.gz' if gz else ''
    images = data.read_idx(str(tmp_path / f'train-images-idx3-ubyte{suffix}'))
    np.testing.assert_array_equal(images, arrays['train-images-idx3-ubyte'])

    ds = data.load_dataset('mnist', data_dir=str(tmp_path), valid_fraction=0.2)
    assert ds.input_shape == (28, 28, 1) and ds.num_classes == 10
    assert (ds.num_train, ds.num_valid, ds.num_test) == (40, 10, 20)
    assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int32
    expected = (arrays['t10k-images-idx3-ubyte'][..., None] / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(ds.test_x, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ds.test_y, arrays['t10k-labels-idx1-ubyte'])
    # train + valid are exactly the training set, with matching labels.
    raw = arrays['train-images-idx3-ubyte'][..., None]
    label_of = {row.tobytes(): int(lab) for row, lab in zip(raw, arrays['train-labels-idx1-ubyte'])}
    for x, y in ((ds.train_x, ds.train_y), (ds.valid_x, ds.valid_y)):
        back = np.rint((x * 0.3081 + 0.1307) * 255).astype(np.uint8)
        assert [label_of[row.tobytes()] for row in back] == y.tolist()


def test_idx_reader_other_dtypes(tmp_path):
    array = np.arange(24, dtype='>i4').reshape(2, 3, 4)
    _write_idx(str(tmp_path / 'a'), array, gz=False)
    out = data.read_idx(str(tmp_path / 'a'))
    np.testing.assert_array_equal(out, array)
    assert out.dtype == np.int32
    (tmp_path / 'bad').write_bytes(b'\x01\x02\x03\x04')
    with pytest.raises(ValueError, match='not an IDX file'):
        data.read_idx(str(tmp_path / 'bad'))


def test_fashion_mnist_torchvision_layout(tmp_path):
    _write_mnist_dir(str(tmp_path / 'FashionMNIST' / 'raw'), gz=False, n_train=30, n_test=10)
    ds = data.load_dataset('fashion_mnist', data_dir=str(tmp_path), valid_fraction=0.1)
    assert (ds.num_train, ds.num_valid, ds.num_test) == (27, 3, 10)
    assert ds.mean == data.FASHION_MNIST_STATS[0]


def test_cifar_pickle_reader(tmp_path):
    batches = _write_cifar_dir(str(tmp_path))
    ds = data.load_dataset('cifar10', data_dir=str(tmp_path), valid_fraction=0.0)
    assert ds.input_shape == (32, 32, 3) and ds.num_classes == 10
    assert (ds.num_train, ds.num_valid, ds.num_test) == (40, 0, 8)
    test = batches['test_batch']
    np.testing.assert_array_equal(ds.test_y, test[b'labels'])
    mean, std = np.array(data.CIFAR10_STATS[0]), np.array(data.CIFAR10_STATS[1])
    n, row, col, ch = 3, 5, 17, 2
    raw = test[b'data'][n, ch * 1024 + row * 32 + col]
    expected = (raw / 255 - mean[ch]) / std[ch]
    np.testing.assert_allclose(ds.test_x[n, row, col, ch], expected, rtol=1e-5)
    # The train split holds the five data batches, in order (valid_fraction=0).
    first = batches['data_batch_1'][b'data'][0].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_allclose(ds.train_x[0], (first / 255 - mean) / std, rtol=1e-5, atol=1e-6)


def test_cifar_reader_rejects_wrong_layout(tmp_path):
    path = tmp_path / 'bad'
    with open(path, 'wb') as f:
        pickle.dump({b'data': np.zeros((2, 100), np.uint8), b'labels': [0, 1]}, f)
    with pytest.raises(ValueError, match='3072'):
        data.read_cifar_batch(str(path))


# ----------------------------------------------------------------------------- errors


def test_missing_data_errors(tmp_path):
    missing = str(tmp_path / 'nothing')
    with pytest.raises(data.DataNotFoundError) as info:
        data.load_dataset('fashion_mnist', data_dir=missing)
    message = str(info.value)
    for part in (missing, 'dataset-fashion-mnist', 'apt-get install', 'train-images-idx3-ubyte'):
        assert part in message
    assert '--config.dataset.data_dir' in message
    assert isinstance(info.value, ValueError)

    with pytest.raises(data.DataNotFoundError, match='mnist_embedded'):
        data.load_dataset('mnist')
    with pytest.raises(data.DataNotFoundError) as info:
        data.load_dataset('cifar10', data_dir=missing)
    assert 'cifar-10-batches-py' in str(info.value) and 'data_dir' in str(info.value)


@pytest.mark.skipif(
    os.path.isdir(data.FASHION_MNIST_DEFAULT_DIR), reason='dataset-fashion-mnist is installed'
)
def test_fashion_mnist_default_dir_message():
    with pytest.raises(data.DataNotFoundError) as info:
        data.load_dataset('fashion_mnist')
    assert data.FASHION_MNIST_DEFAULT_DIR in str(info.value)
    assert 'apt-get install dataset-fashion-mnist' in str(info.value)


def test_unknown_name_lists_allowed():
    with pytest.raises(ValueError) as info:
        data.load_dataset('imagenet_but_wrong')
    message = str(info.value)
    assert not isinstance(info.value, data.DataNotFoundError)
    for name in data.DATASET_NAMES:
        assert name in message
    assert 'tfds:' in message and 'synthetic:' in message
    with pytest.raises(ValueError, match='synthetic:<H>x<W>x<C>:<classes>'):
        data.load_dataset('synthetic:32x32:10')
    with pytest.raises(ValueError, match='valid_fraction'):
        data.load_dataset('digits', valid_fraction=1.5)


def test_tfds_unprepared_fails_fast_offline(tmp_path, no_network):
    start = time.monotonic()
    with pytest.raises(data.DataNotFoundError) as info:
        data.load_dataset('tfds:cifar10', data_dir=str(tmp_path))
    assert 'tfds build cifar10' in str(info.value) and str(tmp_path) in str(info.value)
    with pytest.raises(data.DataNotFoundError, match='downloads/manual'):
        data.open_source('tfds:imagenet2012', data_dir=str(tmp_path))
    with pytest.raises(ValueError, match='namespaces'):
        data.load_dataset('tfds:huggingface:mnist', data_dir=str(tmp_path))
    with pytest.raises(ValueError, match='not a tensorflow-datasets dataset'):
        data.load_dataset('tfds:no_such_dataset_xyz', data_dir=str(tmp_path))
    assert time.monotonic() - start < 20
    assert not os.listdir(tmp_path)  # nothing was written either


# ----------------------------------------------------------------------------- tfds, prepared


def _tiny_tfds_builder_class():
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    class SenspruneTestTiny(tfds.core.GeneratorBasedBuilder):
        """12 + 5 random 6x6x3 uint8 images, 3 classes (Tensor features: no TF needed)."""

        VERSION = tfds.core.Version('1.0.0')

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    'image': tfds.features.Tensor(shape=(6, 6, 3), dtype=np.uint8),
                    'label': tfds.features.ClassLabel(num_classes=3),
                }),
                supervised_keys=('image', 'label'),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {'train': self._generate_examples(12, 0), 'test': self._generate_examples(5, 1)}

        def _generate_examples(self, n, seed):
            rng = np.random.default_rng(seed)
            for i in range(n):
                yield i, {'image': rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), 'label': i % 3}

    return SenspruneTestTiny


_TINY_BUILDER = None


def test_tfds_prepared_array_record(tmp_path, no_network):
    global _TINY_BUILDER  # registered once per process
    if _TINY_BUILDER is None:
        _TINY_BUILDER = _tiny_tfds_builder_class()
    _TINY_BUILDER(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()

    ds = data.load_dataset('tfds:sensprune_test_tiny', data_dir=str(tmp_path), valid_fraction=0.25)
    assert ds.num_classes == 3 and ds.input_shape == (6, 6, 3)
    assert (ds.num_train, ds.num_valid, ds.num_test) == (9, 3, 5)
    np.testing.assert_array_equal(np.bincount(ds.test_y), [2, 2, 1])  # tfds shuffles on prepare
    # Unknown dataset: stats estimated from its training images -> normalised train set.
    np.testing.assert_allclose(ds.train_x.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(ds.train_x.std(axis=(0, 1, 2)), 1.0, atol=1e-4)

    source = data.open_source('tfds:sensprune_test_tiny', data_dir=str(tmp_path))
    assert not source.streamed  # small fixed-size images: in memory
    test = data.StreamedExamples(source.test, np.arange(5), 4, source.mean, source.std, num_workers=2)
    plan = list(data.padded_index_batches(len(test), 4))
    batches = list(test.batches(idx for idx, _ in plan))
    assert [b[0].shape for b in batches] == [(4, 4, 4, 3)] * 2
    np.testing.assert_array_equal(np.concatenate([w for _, w in plan]), [1] * 5 + [0] * 3)


# ----------------------------------------------------------------------------- embedded / synthetic


def test_mnist_embedded_offline():
    ds = data.load_dataset('mnist_embedded')
    assert ds.num_classes == 10 and ds.input_shape == (28, 28, 1)
    assert (ds.num_train, ds.num_valid, ds.num_test) == (3600, 400, 1000)
    np.testing.assert_array_equal(np.bincount(ds.test_y), [100] * 10)
    assert set(np.unique(ds.train_y)) == set(range(10))
    all_x = np.concatenate([ds.train_x, ds.valid_x])
    assert abs(all_x.mean()) < 0.05 and abs(all_x.std() - 1.0) < 0.05
    assert not _rows(ds.test_x) & _rows(all_x)


def test_split_deterministic_and_disjoint():
    a = data.load_dataset('mnist_embedded', seed=3, max_train=500)
    b = data.load_dataset('mnist_embedded', seed=3, max_train=500)
    c = data.load_dataset('mnist_embedded', seed=4, max_train=500)
    for field in ('train_x', 'train_y', 'valid_x', 'valid_y', 'test_x', 'test_y'):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert (a.num_train, a.num_valid) == (450, 50)
    assert not _rows(a.train_x) & _rows(a.valid_x)
    assert _rows(a.valid_x) != _rows(c.valid_x)
    np.testing.assert_array_equal(a.test_x, c.test_x)  # the test split never depends on seed

    train, valid = data.split_indices(1000, 0.1, seed=7)
    assert len(valid) == 100 and not set(train) & set(valid)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, valid])), np.arange(1000))
    train2, valid2 = data.split_indices(1000, 0.1, seed=7, max_examples=200)
    assert len(train2) + len(valid2) == 200 and len(valid2) == 20


def test_digits_and_synthetic():
    digits = data.load_dataset('digits')
    assert digits.input_shape == (8, 8, 1) and digits.num_classes == 10
    assert digits.num_train + digits.num_valid + digits.num_test == 1797

    syn = data.load_dataset('synthetic:12x10x3:4', max_train=100, max_test=40)
    assert syn.input_shape == (12, 10, 3) and syn.num_classes == 4
    assert (syn.num_train, syn.num_valid, syn.num_test) == (90, 10, 40)
    again = data.load_dataset('synthetic:12x10x3:4', max_train=100, max_test=40)
    np.testing.assert_array_equal(syn.train_x, again.train_x)
    # Learnable: nearest class mean (from train) classifies the test set well.
    means = np.stack([syn.train_x[syn.train_y == k].mean(0) for k in range(4)])
    dist = ((syn.test_x[:, None] - means[None]) ** 2).sum(axis=(2, 3, 4))
    assert (dist.argmin(1) == syn.test_y).mean() > 0.9


def test_image_size_resizes():
    ds = data.load_dataset('mnist_embedded', image_size=32, max_train=20, max_test=10)
    assert ds.input_shape == (32, 32, 1) and ds.test_x.shape == (10, 32, 32, 1)


# ----------------------------------------------------------------------------- batching


def test_epoch_plan_and_array_examples_deterministic_and_covering():
    """The one batching path: `train.epoch_order` plans, `Examples.batches` gathers."""
    from experiments import train as train_lib  # pylint: disable=import-outside-toplevel
    from experiments import train_config  # pylint: disable=import-outside-toplevel

    x = np.arange(103)
    examples = data.ArrayExamples(x, 2 * x)
    spe = train_config.steps_per_epoch(103, {'num_epochs': 1, 'batch_size': 10, 'learning_rate': 0.1})
    assert spe == 11  # the last batch wraps around to the start of the permutation

    def epoch(seed, e):
        return list(examples.batches(train_lib.epoch_order(seed, e, 103, spe, 10), seed=seed, epoch=e))

    first, again, other = epoch(1, 0), epoch(1, 0), epoch(1, 1)
    assert all(np.array_equal(p[0], q[0]) for p, q in zip(first, again))
    assert not np.array_equal(np.concatenate([b[0] for b in first]), np.concatenate([b[0] for b in other]))
    for batches in (first, other):
        assert all(bx.shape == (10,) and np.array_equal(by, 2 * bx) for bx, by in batches)
        np.testing.assert_array_equal(np.unique(np.concatenate([b[0] for b in batches])), x)
    with pytest.raises(ValueError, match='examples'):
        data.ArrayExamples(x[:5], x)


def test_padded_index_batches_weights():
    x = np.ones((7, 2, 2, 1), np.float32)
    y = np.arange(7, dtype=np.int32)
    plan = list(data.padded_index_batches(7, 3))
    batches = list(data.ArrayExamples(x, y).batches(idx for idx, _ in plan))
    assert [b[0].shape for b in batches] == [(3, 2, 2, 1)] * 3
    np.testing.assert_array_equal(np.concatenate([w for _, w in plan]), [1] * 7 + [0] * 2)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches])[:7], y)
    np.testing.assert_array_equal(plan[-1][0][1:], 0)  # padding rows repeat example 0


def test_as_examples():
    x, y = np.zeros((4, 2)), np.arange(4)
    examples = data.as_examples(x, y)
    assert isinstance(examples, data.ArrayExamples) and len(examples) == 4
    assert data.as_examples(examples) is examples
    with pytest.raises(ValueError, match='labels'):
        data.as_examples(x)
    with pytest.raises(ValueError, match='holds its own'):
        data.as_examples(examples, y)


def test_prefetch_order_errors_and_early_stop():
    assert list(data.prefetch(iter(range(10)), depth=2)) == list(range(10))

    def failing():
        yield 1
        raise RuntimeError('boom')

    with pytest.raises(RuntimeError, match='boom'):
        list(data.prefetch(failing()))
    produced = []

    def endless():
        for i in itertools.count():
            produced.append(i)
            yield i

    stream = data.prefetch(endless(), depth=2)
    assert next(stream) == 0
    stream.close()  # stops the producer
    time.sleep(0.3)
    assert len(produced) <= 5


def test_sample_set(caplog):
    ds = data.from_dataset(data.load_dataset('digits', valid_fraction=0.1))
    s, s_y = data.sample_set(ds.valid, 50, seed=0)
    assert s.shape == (50, 8, 8, 1) and s_y.shape == (50,)
    np.testing.assert_array_equal(s, data.sample_set(ds.valid, 50, seed=0)[0])
    valid_rows = [row.tobytes() for row in ds.valid.x]
    positions = [valid_rows.index(row.tobytes()) for row in s]
    assert len(set(positions)) == 50  # without replacement, from the validation split
    np.testing.assert_array_equal(s_y, ds.valid.y[positions])
    with caplog.at_level(logging.WARNING):
        everything, _ = data.sample_set(ds.valid, 10_000, seed=0)
    assert len(everything) == ds.num_valid
    assert any('validation split' in r.getMessage() for r in caplog.records)
    empty = data.from_dataset(data.load_dataset('digits', valid_fraction=0.0))
    with pytest.raises(ValueError, match='validation split is empty'):
        data.sample_set(empty.valid, 5, seed=0)


# ----------------------------------------------------------------------------- streaming


def _variable_records(n=6, channels=3):
    rng = np.random.default_rng(0)
    sizes = [(40, 60), (64, 48), (50, 50), (33, 80), (70, 45), (48, 48)]
    return [
        {'image': rng.integers(0, 256, (*sizes[i % len(sizes)], channels), dtype=np.uint8), 'label': i % 4}
        for i in range(n)
    ]


def _streamed(records, n=None, augment=False, workers=2, channels=3):
    indices = np.arange(len(records) if n is None else n)
    return data.StreamedExamples(records, indices, 16, (0.5,) * channels, (0.25,) * channels,
                                 augment=augment, num_workers=workers)


def test_streamed_examples_train_and_eval():
    from experiments import train as train_lib  # pylint: disable=import-outside-toplevel

    records = _variable_records()
    train = lambda e, w: list(_streamed(records, augment=True, workers=w).batches(  # noqa: E731
        train_lib.epoch_order(0, e, 6, 1, 4), seed=0, epoch=e))
    first, again = train(0, 2), train(0, 0)
    assert len(first) == 1 and first[0][0].shape == (4, 16, 16, 3)
    assert first[0][0].dtype == np.float32 and first[0][1].dtype == np.int32
    np.testing.assert_array_equal(first[0][0], again[0][0])  # threads do not change the result
    np.testing.assert_array_equal(first[0][1], again[0][1])
    assert not np.array_equal(first[0][0], train(1, 2)[0][0])
    test = _streamed(records, n=5)
    plan = list(data.padded_index_batches(len(test), 3))
    batches = list(test.batches(idx for idx, _ in plan))
    assert [len(b[0]) for b in batches] == [3, 3]
    np.testing.assert_array_equal(np.concatenate([w for _, w in plan]), [1] * 5 + [0])
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches])[:5], [0, 1, 2, 3, 0])
    # Eval transform: resize the shorter side to round(16 * 256 / 224) = 18, center-crop 16.
    expected = data.eval_transform(records[1]['image'], 16)
    np.testing.assert_allclose(batches[0][0][1], (expected / 255 - 0.5) / 0.25, atol=1e-5)


def test_streamed_examples_local_rows_split_each_batch():
    """Two 'processes' holding rows [0, 1] and [2, 3] of every batch of 4 read disjoint examples
    that together give the single-process batches (grayscale too); augmentation depends on the
    example, not on who decodes it."""
    from experiments import train as train_lib  # pylint: disable=import-outside-toplevel

    for channels, host_augment in itertools.product((3, 1), (True, False)):
        examples = _streamed(_variable_records(channels=channels), augment=host_augment, workers=0,
                             channels=channels)
        order = train_lib.epoch_order(0, 0, 6, 2, 4)
        full = list(examples.batches(order, seed=0, epoch=0))
        parts = [list(examples.batches((idx[r] for idx in order), seed=0, epoch=0))
                 for r in ([0, 1], [2, 3])]
        assert len(parts[0]) == len(parts[1]) == len(full) == 2
        for whole, a, b in zip(full, *parts):
            assert len(a[0]) == len(b[0]) == 2
            for k in range(2):
                np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), whole[k])


def test_eval_transform_center_crop():
    image = np.arange(20 * 30 * 3, dtype=np.int64).reshape(20, 30, 3).astype(np.uint8)
    out = data.eval_transform(image, image_size=20, resize_size=20)
    np.testing.assert_array_equal(out, image[:, 5:25])  # no resize needed: pure center crop
    assert data.eval_transform(image, 224).shape == (224, 224, 3)


# ----------------------------------------------------------------------------- augmentation


def _numpy_pad_crop_flip(x, offsets, flips, pad):
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, w = x.shape[1:3]
    out = np.stack([padded[i, r:r + h, c:c + w] for i, (r, c) in enumerate(offsets)])
    return np.where(flips[:, None, None, None], out[:, :, ::-1], out)


def test_pad_crop_flip_matches_numpy_reference():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 8, 8, 3)), jnp.float32)
    key = jax.random.key(42)
    out = jax.jit(augment.pad_crop_flip)(key, x)
    assert out.shape == x.shape
    np.testing.assert_array_equal(out, jax.jit(augment.pad_crop_flip)(key, x))
    offsets, flips = map(np.asarray, augment.pad_crop_params(key, batch=64, pad=4))
    expected = _numpy_pad_crop_flip(np.asarray(x), offsets, flips, 4)
    np.testing.assert_allclose(np.asarray(out), expected)
    # It really shifts and flips, with different draws per example.
    assert 0 < flips.sum() < 64 and len({tuple(o) for o in offsets}) > 10
    assert not np.array_equal(out, jax.jit(augment.pad_crop_flip)(jax.random.key(43), x))


def test_pad_crop_fill_and_no_flip():
    x = jnp.zeros((16, 4, 4, 2))
    fill = jnp.array([1.0, -1.0])
    out = np.asarray(augment.pad_crop(jax.random.key(0), x, pad=2, fill=fill))
    offsets, _ = map(np.asarray, augment.pad_crop_params(jax.random.key(0), batch=16, pad=2))
    padded = np.asarray(jnp.broadcast_to(fill, (16, 8, 8, 2))).copy()
    padded[:, 2:6, 2:6] = 0
    expected = np.stack([padded[i, r:r + 4, c:c + 4] for i, (r, c) in enumerate(offsets)])
    np.testing.assert_array_equal(out, expected)


def test_random_resized_crop_flip():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 40, 48, 3)), jnp.float32)
    fn = jax.jit(lambda k, v: augment.random_resized_crop_flip(k, v, 24))
    out = fn(jax.random.key(0), x)
    assert out.shape == (8, 24, 24, 3)
    np.testing.assert_array_equal(out, fn(jax.random.key(0), x))
    boxes, _ = augment.random_resized_crop_params(jax.random.key(0), batch=500, height=40, width=48)
    boxes = np.asarray(boxes)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 40).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= 48).all()
    area = boxes[:, 2] * boxes[:, 3] / (40 * 48)
    assert area.min() > 0.06 and area.max() <= 1.0
    # A box of exactly the output size is a plain (possibly flipped) slice.
    crop_resize = jax.jit(augment._crop_resize_one, static_argnames='size')
    crop = crop_resize(x[0], jnp.array([5.0, 7.0, 24.0, 24.0]), jnp.array(True), size=24)
    np.testing.assert_allclose(crop, x[0, 5:29, 7:31][:, ::-1], atol=1e-5)


def test_augmentation_registry():
    x = jnp.ones((2, 32, 32, 3))
    assert set(augment.AUGMENTATIONS) >= {'none', 'cifar', 'imagenet'}
    assert augment.get_augmentation('none')(jax.random.key(0), x) is x
    key = jax.random.key(0)
    def shape(name, **kwargs):
        return jax.eval_shape(augment.get_augmentation(name, **kwargs), key, x).shape

    assert shape('cifar') == shape('pad_crop') == x.shape
    assert shape('imagenet') == (2, 224, 224, 3)
    assert shape('cifar', fill=augment.reference_fill((0.5,) * 3, (0.25,) * 3)) == x.shape
    with pytest.raises(ValueError, match='cifar'):
        augment.get_augmentation('autoaugment')
