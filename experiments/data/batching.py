"""The one batching path: index batches in, `(x, y)` host batches out.

The training loop plans which examples each step sees (`experiments.train.epoch_order`:
a seeded permutation per epoch; evaluation: in order, the last batch padded) and hands
those index batches to an `Examples` object, which turns each into a batch of normalised
NHWC float32 images and int32 labels:

- `ArrayExamples`: arrays in memory (small data: MNIST, digits, CIFAR, synthetic); a
  batch is a gather.
- `experiments.data.streaming.StreamedExamples`: records decoded and transformed on the
  fly on a thread pool, a few batches ahead (ImageNet); memory does not grow with the
  dataset.

Per-example randomness (host-side augmentation) is a pure function of
`(seed, epoch, example index)`, so batches do not depend on how the work is split across
threads or hosts.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any, Iterable, Iterator, Protocol, runtime_checkable

import numpy as np

Batch = tuple[np.ndarray, np.ndarray]


@runtime_checkable
class Examples(Protocol):
    """A split that yields batches by example index."""

    def __len__(self) -> int:
        ...

    def take(self, indices: np.ndarray, *, seed: int = 0, epoch: int = 0) -> Batch:
        """Images and labels of `indices` (a 1-D int array), in that order."""
        ...

    def batches(
        self, index_batches: Iterable[np.ndarray], *, seed: int = 0, epoch: int = 0
    ) -> Iterator[Batch]:
        """`take` of every index batch, in order."""
        ...


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayExamples:
    """Examples held in memory as arrays (`x[i]`, `y[i]`)."""

    x: np.ndarray = dataclasses.field(repr=False)
    y: np.ndarray = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f'x has {len(self.x)} examples but y has {len(self.y)}')

    def __len__(self) -> int:
        return len(self.y)

    def take(self, indices: np.ndarray, *, seed: int = 0, epoch: int = 0) -> Batch:
        del seed, epoch  # in-memory examples are augmented on the device, if at all
        return self.x[indices], self.y[indices]

    def batches(
        self, index_batches: Iterable[np.ndarray], *, seed: int = 0, epoch: int = 0
    ) -> Iterator[Batch]:
        for indices in index_batches:
            yield self.take(indices, seed=seed, epoch=epoch)


def as_examples(x: Any, y: Any = None) -> Examples:
    """`x` itself when it is an `Examples` (then `y` must be None), else `ArrayExamples(x, y)`."""
    if isinstance(x, Examples) and not isinstance(x, np.ndarray):
        if y is not None:
            raise ValueError('pass labels only with arrays: an Examples object holds its own')
        return x
    if y is None:
        raise ValueError('labels are missing: pass (x, y) arrays or one Examples object')
    return ArrayExamples(np.asarray(x), np.asarray(y))


def padded_index_batches(n: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Evaluation order: `(indices, weights)` of consecutive batches of `range(n)`.

    The last batch is padded to `batch_size` with example 0 at weight 0.0, so every batch has
    the same shape; metrics are `sum(weight * metric) / sum(weight)`.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f'need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}')
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        real = idx < n
        yield np.where(real, idx, 0), real.astype(np.float32)


_DONE = object()


def prefetch(batches: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Runs `batches` on a background thread, at most `depth` items ahead of the consumer.

    Exceptions of the producer are raised in the consumer; a consumer that stops early
    (or fails) stops the producer at its next item.
    """
    if depth < 1:
        yield from batches
        return
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in batches:
                if not put((item, None)):
                    return
        except BaseException as error:  # pylint: disable=broad-except
            put((None, error))
            return
        put((_DONE, None))

    thread = threading.Thread(target=produce, name='prefetch', daemon=True)
    thread.start()
    try:
        while True:
            item, error = items.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5.0)
