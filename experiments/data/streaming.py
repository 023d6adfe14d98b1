"""Streamed examples: records decoded, transformed and normalised when a batch is taken.

For datasets that do not fit in memory or whose images vary in size (ImageNet as tfds
array_record). Each image is decoded from its JPEG bytes when its record is read, then

- train (`augment=True`): torchvision `RandomResizedCrop(image_size)` +
  `RandomHorizontalFlip()` with randomness from `(seed, epoch, index)`;
- eval: `Resize(round(image_size * 256 / 224))` + `CenterCrop(image_size)`;

and normalised. `batches` decodes on a thread pool (PIL releases the GIL) and runs
`prefetch_batches` batches ahead on a background thread: memory holds a few batches,
whatever the size of the dataset.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from experiments.data import batching, common, transforms


@dataclasses.dataclass(frozen=True, eq=False)
class StreamedExamples:
    """A split of random-access records (`records[i]` -> {image_key: HWC uint8, label_key: int}).

    `indices` selects (and orders) the records this split holds, e.g. the train or valid
    part of a tfds train split; position `i` of this split is record `indices[i]`.
    """

    records: Sequence[Mapping[str, Any]] = dataclasses.field(repr=False)
    indices: np.ndarray = dataclasses.field(repr=False)
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False
    image_key: str = 'image'
    label_key: str = 'label'
    num_workers: int = 8
    prefetch_batches: int = 2

    def __len__(self) -> int:
        return len(self.indices)

    def decode(self, position: int, *, seed: int = 0, epoch: int = 0) -> tuple[np.ndarray, int]:
        """The uint8 image (`image_size` square) and label at `position` of this split."""
        index = int(self.indices[position])
        record = self.records[index]
        image = np.asarray(record[self.image_key], dtype=np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        if self.augment:
            rng = np.random.default_rng([seed, epoch, index])
            image = transforms.train_transform(image, rng, self.image_size)
        else:
            image = transforms.eval_transform(image, self.image_size)
        return image, int(record[self.label_key])

    def take(
        self,
        indices: np.ndarray,
        *,
        seed: int = 0,
        epoch: int = 0,
        pool: concurrent.futures.Executor | None = None,
    ) -> batching.Batch:
        """Decoded, normalised NHWC float32 images and int32 labels at `indices`."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        if len(indices) == 0:
            shape = (0, self.image_size, self.image_size, len(self.mean))
            return np.zeros(shape, np.float32), np.zeros((0,), np.int32)
        decode = lambda p: self.decode(int(p), seed=seed, epoch=epoch)  # noqa: E731
        examples = list(pool.map(decode, indices) if pool is not None else map(decode, indices))
        x = np.stack([image for image, _ in examples])
        y = np.asarray([label for _, label in examples], np.int32)
        return common.normalise(x, 255.0, self.mean, self.std), y

    def batches(
        self, index_batches: Iterable[np.ndarray], *, seed: int = 0, epoch: int = 0
    ) -> Iterator[batching.Batch]:
        """`take` of every index batch, decoded on `num_workers` threads, prefetched."""
        if self.num_workers <= 0:
            produced = (self.take(b, seed=seed, epoch=epoch) for b in index_batches)
            yield from batching.prefetch(produced, self.prefetch_batches)
            return
        with concurrent.futures.ThreadPoolExecutor(self.num_workers, 'decode') as pool:
            produced = (self.take(b, seed=seed, epoch=epoch, pool=pool) for b in index_batches)
            yield from batching.prefetch(produced, self.prefetch_batches)
