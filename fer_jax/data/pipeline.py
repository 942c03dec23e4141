"""Grain input pipelines: decode, resize, augment, batch, shard per device.

Batches are dicts of NumPy arrays with a leading device axis:
images uint8 [D, B/D, H, W, 3], label int32 [D, B/D], va float32
[D, B/D, 2], va_mask bool [D, B/D] and mask bool [D, B/D] (False on the
padding that completes the last evaluation batch); soft float32
[D, B/D, K], the targets, where the records have them (FERPlus).
Normalisation happens on the device. With several processes, B is a
process's share of the global batch and D its local devices: process p
reads the p-th 1/P of every global training batch, and the p-th
contiguous 1/P of an evaluated split.
"""

import concurrent.futures
import dataclasses
import functools
import itertools
import math
from typing import Iterator

import grain
import ml_collections
from absl import logging
import numpy as np

from fer_jax.data import images
from fer_jax.data.index import Records


def load_image(record: dict, data: ml_collections.ConfigDict) -> np.ndarray:
  """A record's base image, as evaluation sees it."""
  if 'pixels' in record:  # a layout that ships pixels, not files
    return images.from_pixels(record['pixels'], data.image_size)
  return images.load(record['path'], data.image_size, record['box'],
                     data.face_margin)


def base_image(record: dict, data: ml_collections.ConfigDict) -> np.ndarray:
  """A record's base image: held in memory (hold_decoded), or loaded."""
  image = record.get('image')
  return load_image(record, data) if image is None else image


def hold_decoded(splits: dict[str, Records], data: ml_collections.ConfigDict
                 ) -> dict[str, Records]:
  """The splits with their base images decoded into memory, once, when all
  of them fit in data.cache_decoded_mb; otherwise as they are (decoded in
  every epoch). The batches are the same either way."""
  num_bytes = 3 * data.image_size ** 2 * sum(len(r) for r in splits.values())
  if num_bytes > data.get('cache_decoded_mb', 0) * 2 ** 20:
    return splits
  logging.info('Decoding %d MB of base images into memory (data.'
               'cache_decoded_mb)', num_bytes // 2 ** 20)
  empty = np.zeros((0, data.image_size, data.image_size, 3), np.uint8)
  with concurrent.futures.ThreadPoolExecutor(data.num_threads) as pool:
    decode = lambda r: list(pool.map(lambda i: load_image(r[i], data),
                                     range(len(r))))
    return {name: dataclasses.replace(
        r, images=np.stack(decode(r)) if len(r) else empty)
            for name, r in splits.items()}


def _load(record: dict, data: ml_collections.ConfigDict) -> dict:
  """An example with its base image (no augmentation)."""
  example = {'image': base_image(record, data), 'label': record['label'], 'va': record['va'],
             'va_mask': record['va_mask'], 'mask': np.True_}
  if 'soft' in record:  # targets (FERPlus's kept votes, or a drawn label)
    example['soft'] = record['soft']
  return example


def _load_augmented(record: dict, rng: np.random.Generator,
                    data: ml_collections.ConfigDict) -> dict:
  example = _load(record, data)
  example['image'] = images.augment_image(example['image'], rng, data.augment)
  return example


def _shard(batch: dict, num_devices: int) -> dict:
  """Reshapes [B, ...] to [devices, B / devices, ...]."""
  return {k: v.reshape(num_devices, -1, *v.shape[1:]) for k, v in batch.items()}


def pad_and_shard(batch: dict, batch_size: int, num_devices: int) -> dict:
  """A short batch completed with masked copies of its first row, sharded."""
  n = len(batch['mask'])
  if n < batch_size:
    batch = {k: np.concatenate([v, np.repeat(v[:1], batch_size - n, axis=0)])
             for k, v in batch.items()}
    batch['mask'][n:] = False
  return _shard(batch, num_devices)


def _read(ds: grain.MapDataset, config: ml_collections.ConfigDict
          ) -> grain.IterDataset:
  options = grain.ReadOptions(num_threads=config.num_threads,
                              prefetch_buffer_size=config.prefetch_batches)
  ds = ds.to_iter_dataset(options)
  if config.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.num_workers))
  return ds


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full training batches in one pass over the data."""
  return num_examples // batch_size


def balanced_indices(labels: np.ndarray, num_samples: int,
                     rng: np.random.Generator) -> np.ndarray:
  """num_samples indices drawn with replacement, every class equally likely."""
  counts = np.bincount(labels)
  p = 1.0 / (counts[labels] * np.count_nonzero(counts))
  return rng.choice(len(labels), size=num_samples, replace=True, p=p)


def drawn_labels(soft: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """One class per row of soft [N, K], drawn with the row's probabilities
  (a class of probability 0 never)."""
  cumulative = np.cumsum(soft, axis=1, dtype=np.float64)
  threshold = rng.random(len(soft)) * cumulative[:, -1]
  return np.argmax(cumulative > threshold[:, None], axis=1)


def draws_labels(data: ml_collections.ConfigDict) -> bool:
  """Whether training draws each example's label every epoch from its
  target distribution (FERPlus's data.ferplus_labels='probability')."""
  return (data.get('layout') == 'ferplus' and
          data.get('ferplus_labels') == 'probability')


class RunOrder:
  """The examples of a whole training run: i is epoch i // E's (i % E)-th.

  Each epoch's order depends on (seed, epoch) alone: a permutation
  (data.sampler 'uniform') or E draws with replacement, every class equally
  likely by the records' labels ('balanced', for class imbalance). With
  draw_labels, each record's target for the epoch is the one-hot of a
  class drawn from its distribution (records.soft), also by (seed, epoch)
  alone, in a stream of its own. Both are drawn when first needed, in each
  worker process, so the source stays light to send to them.
  """

  def __init__(self, records: Records, sampler: str, seed: int,
               num_epochs: int, examples_per_epoch: int,
               draw_labels: bool = False):
    if sampler not in ('uniform', 'balanced'):
      raise ValueError(f"data.sampler: {sampler!r} is not 'uniform' or "
                       "'balanced'")
    if draw_labels and records.soft is None:
      raise ValueError('data.ferplus_labels: probability needs the '
                       'training records\' target distributions')
    self.records, self.sampler, self.seed = records, sampler, seed
    self.num_epochs, self.examples_per_epoch = num_epochs, examples_per_epoch
    self.draw_labels = draw_labels
    self._orders = {}

  def __len__(self) -> int:
    return self.num_epochs * self.examples_per_epoch

  def __getstate__(self) -> dict:
    return {**self.__dict__, '_orders': {}}

  def epoch_order(self, epoch: int) -> np.ndarray:
    """Positions in records of epoch `epoch` (0-based), in order."""
    rng = np.random.default_rng([self.seed, epoch])
    n = len(self.records)
    if self.sampler == 'uniform':
      return rng.permutation(n)[:self.examples_per_epoch]
    return balanced_indices(self.records.labels, self.examples_per_epoch, rng)

  def epoch_labels(self, epoch: int) -> np.ndarray:
    """Each record's class drawn for epoch `epoch` (0-based), [N]."""
    # (seed, epoch, 1): its own stream, so the order is the one the same
    # seed gives without drawing.
    rng = np.random.default_rng([self.seed, epoch, 1])
    return drawn_labels(self.records.soft, rng)

  def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The epoch's order and drawn labels, kept for it and the one before."""
    drawn = self._orders.get(epoch)  # threads may race here: both compute
    if drawn is None:
      drawn = (self.epoch_order(epoch),
               self.epoch_labels(epoch) if self.draw_labels else None)
      self._orders = {epoch: drawn, **{
          k: v for k, v in self._orders.items() if k == epoch - 1}}
    return drawn

  def __getitem__(self, i: int) -> dict:
    epoch, position = divmod(int(i), self.examples_per_epoch)
    order, labels = self._epoch(epoch)
    index = int(order[position])
    record = self.records[index]
    if labels is not None:  # the drawn class as the target, one-hot
      record['soft'] = np.zeros_like(record['soft'])
      record['soft'][labels[index]] = 1
    return record


def _process_batch_size(batch_size: int, field: str, num_devices: int,
                        process_count: int) -> int:
  """A process's share of a global batch, checked to divide evenly."""
  if batch_size % (num_devices * process_count):
    raise ValueError(f'{field}: {batch_size} is not divisible by '
                     f'{num_devices * process_count} devices')
  return batch_size // process_count


def train_batches(records: Records, config: ml_collections.ConfigDict,
                  num_devices: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1
                  ) -> grain.DatasetIterator:
  """The shuffled, augmented batches of a whole run, from start_step on.

  train.num_epochs x steps_per_epoch batches; no batch spans two epochs.
  Batch k depends only on (train.seed, k): the iterator's state
  (get_state / set_state, saved in checkpoints) or start_step resumes a run
  exactly. Augmentation draws from a generator Grain seeds per example;
  FERPlus's probability mode draws each epoch's labels (RunOrder).
  With several processes, process_index's rows of each global batch.
  """
  batch_size = config.train.batch_size
  local = _process_batch_size(batch_size, 'train.batch_size', num_devices,
                              process_count)
  steps = steps_per_epoch(len(records), batch_size)
  if steps == 0:
    raise ValueError(f'train.batch_size: {batch_size} is more than the '
                     f'{len(records)} training examples')
  source = RunOrder(records.without_landmarks(), config.data.sampler,
                    config.train.seed, config.train.num_epochs,
                    steps * batch_size, draws_labels(config.data))
  load = functools.partial(_load_augmented,
                           data=ml_collections.FrozenConfigDict(config.data))
  # Grain seeds each example's augmentation by its index in the whole run,
  # before the run is cut into this process's share: the P shares of global
  # batch k are the local batches k*P..k*P+P-1.
  ds = (grain.MapDataset.source(source).seed(config.train.seed)
        .random_map(load).batch(local, drop_remainder=True)
        [start_step * process_count + process_index::process_count]
        .map(functools.partial(_shard, num_devices=num_devices)))
  return iter(_read(ds, config.data))


def _masked_batch(batch_size: int, image_size: int, num_devices: int,
                  soft: np.ndarray | None) -> dict:
  """A batch of nothing (mask False everywhere), to keep processes in step;
  with target distributions where the records have them (soft)."""
  extra = {} if soft is None else {
      'soft': np.zeros((batch_size, soft.shape[1]), np.float32)}
  return _shard({**extra, 'image': np.zeros((batch_size, image_size, image_size, 3),
                                   np.uint8),
                 'label': np.zeros(batch_size, np.int32),
                 'va': np.zeros((batch_size, 2), np.float32),
                 'va_mask': np.zeros(batch_size, bool),
                 'mask': np.zeros(batch_size, bool)}, num_devices)


def eval_batches(records: Records, config: ml_collections.ConfigDict,
                 num_devices: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """Every example exactly once, in order; the last batch padded and masked.

  With several processes, this process's contiguous 1/P of the records;
  every process yields the same number of batches (the pmapped step is a
  collective), the short ones ending with fully masked batches.
  """
  local = _process_batch_size(config.train.eval_batch_size,
                              'train.eval_batch_size', num_devices,
                              process_count)
  share = -(-len(records) // process_count)
  mine = records.subset(np.arange(process_index * share,
                                  min(len(records), (process_index + 1) *
                                      share)))
  ds = (grain.MapDataset.source(mine.without_landmarks())
        .map(functools.partial(
            _load, data=ml_collections.FrozenConfigDict(config.data)))
        .batch(local, drop_remainder=False)
        .map(functools.partial(pad_and_shard, batch_size=local,
                               num_devices=num_devices)))
  batches = iter(_read(ds, config.data)) if len(mine) else iter(())
  missing = math.ceil(share / local) - math.ceil(len(mine) / local)
  return itertools.chain(batches, itertools.repeat(_masked_batch(
      local, config.data.image_size, num_devices, records.soft), missing))
