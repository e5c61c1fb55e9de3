"""The input pipeline: batches of a `data.Dataset` read through grain (docs/data.md).

Epoch e visits `epoch_order(seed, e, n)`, so the order depends on the seed alone and a run resumes
from grain's iterator state (`get_state()`); with P processes, process p reads the p-th of P
near-equal slices of every global batch (`process_slice`). Images are decoded in
`Dataset.images[i]`, so in grain's worker processes when `workers > 0`; augmentation stays on the
device, a function of the step's key, independent of which process or worker read the images.
"""

import dataclasses
import functools
from typing import Iterator

from absl import flags
import grain
import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """How batches are read: `workers` decoding processes (0: in this process), `threads` reader
  threads per process, `prefetch` batches read ahead (per worker)."""
  workers: int = 0
  threads: int = 4
  prefetch: int = 2

  @classmethod
  def from_config(cls, config) -> "PipelineConfig":
    p = config.pipeline
    return cls(workers=int(p.workers), threads=int(p.threads), prefetch=int(p.prefetch))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of epoch `epoch`: default_rng([seed, epoch]).permutation(n)."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def process_slice(indices: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
  """Process p's part of a global batch: the p-th of `process_count` near-equal slices."""
  return np.array_split(indices, process_count)[process_index]


def read(images, indices) -> np.ndarray:
  """The images at `indices`, stacked: numpy arrays and data.ImageSource (one read per image)
  index alike."""
  return np.asarray(images[np.asarray(indices)])


class _ReadTrainBatch:
  """step -> this process's part of global batch `step` (picklable, for grain's workers): its
  slice when the batch splits into `shard_multiple` equal parts (one per device), else all of
  it (the batch then runs whole on every device)."""

  def __init__(self, images, labels, batch_size, seed, drop_remainder, process_index,
               process_count, shard_multiple=1):
    self.images, self.labels = images, np.asarray(labels)
    self.n, self.batch_size, self.seed = len(self.labels), batch_size, seed
    self.process = (process_index, process_count)
    self.shard_multiple = max(shard_multiple, process_count)
    self.steps_per_epoch = steps_per_epoch(self.n, batch_size, drop_remainder)

  @functools.lru_cache(maxsize=2)
  def order(self, epoch: int) -> np.ndarray:
    return epoch_order(self.seed, epoch, self.n)

  def __call__(self, step: int) -> dict:
    epoch, b = divmod(int(step), self.steps_per_epoch)
    batch = self.order(epoch)[b * self.batch_size:(b + 1) * self.batch_size]
    idx = process_slice(batch, *self.process) if len(batch) % self.shard_multiple == 0 else batch
    return {"image": read(self.images, idx), "label": self.labels[idx], "index": idx,
            "epoch": np.int32(epoch), "global_size": np.int32(len(batch))}


def steps_per_epoch(n: int, batch_size: int, drop_remainder: bool = False) -> int:
  return n // batch_size if drop_remainder else -(-n // batch_size)


def _iterate(dataset: grain.MapDataset, pipeline: PipelineConfig) -> grain.DatasetIterator:
  # Bounded read-ahead: grain's default buffers 500 elements, here whole batches (each thread
  # needs a slot of its own).
  threads = max(pipeline.threads, 1)
  it = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=max(pipeline.prefetch, threads)))
  if pipeline.workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a library call or a
      flags.FLAGS.mark_as_parsed()   # notebook has not parsed them: use their defaults
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=pipeline.workers, per_worker_buffer_size=max(pipeline.prefetch, 1)))
  return iter(it)


def train_batches(images, labels, *, batch_size: int, seed: int, epochs: int,
                  pipeline: PipelineConfig = PipelineConfig(), drop_remainder: bool = False,
                  process_index: int | None = None, process_count: int | None = None,
                  shard_multiple: int = 1) -> grain.DatasetIterator:
  """`epochs` shuffled epochs of (this process's part of) global batches of `batch_size`:
  dicts of `image` (uint8 or float, B x H x W x C), `label`, `index` (rows of the set),
  `epoch` and `global_size` (rows of the whole batch). A batch whose size is not a multiple of
  `shard_multiple` (the device count) is read whole by every process. Checkpointable with
  `get_state()` / `set_state()`."""
  n = len(labels)
  if n == 0:
    raise ValueError("cannot batch an empty set")
  p = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  reader = _ReadTrainBatch(images, labels, min(batch_size, n), seed, drop_remainder, p, count,
                           shard_multiple)
  steps = reader.steps_per_epoch * epochs
  return _iterate(grain.MapDataset.range(steps).map(reader), pipeline)


class _ReadEvalBatch:
  """k -> batch k of this process's contiguous shard, padded to full size by repetition."""

  def __init__(self, images, labels, shard: np.ndarray, batch_size: int):
    self.images, self.labels, self.shard, self.batch_size = images, np.asarray(labels), shard, batch_size

  def __call__(self, k: int) -> dict:
    start = int(k) * self.batch_size
    valid = max(min(self.batch_size, len(self.shard) - start), 0)
    # An empty shard (fewer rows than processes) pads with row 0, all masked out.
    shard = self.shard if len(self.shard) else np.zeros((1,), np.int64)
    idx = shard[np.arange(start, start + self.batch_size) % len(shard)]
    return {"image": read(self.images, idx), "label": self.labels[idx],
            "mask": np.arange(self.batch_size) < valid}


def eval_batches(images, labels, *, batch_size: int, pipeline: PipelineConfig = PipelineConfig(),
                 process_index: int | None = None, process_count: int | None = None,
                 multiple: int = 1) -> Iterator[dict]:
  """This process's contiguous shard of the set in order, in fixed-size batches: every process
  gets the same number of batches of the same size (at most `batch_size`, a multiple of
  `multiple`, its local device count), padded by repetition; `mask` marks the real rows.
  Evaluation thus compiles once and runs sharded over every device."""
  p = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  n = len(labels)
  shard = process_slice(np.arange(n), p, count)
  longest = -(-n // count)  # the largest shard
  if longest == 0:
    return iter(())
  size = -(-min(batch_size, longest) // multiple) * multiple
  reader = _ReadEvalBatch(images, labels, shard, size)
  return _iterate(grain.MapDataset.range(-(-longest // size)).map(reader), pipeline)
