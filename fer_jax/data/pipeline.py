"""Grain input pipelines: decode, resize, augment, batch, shard per device.

Batches are dicts of NumPy arrays with a leading device axis:
images uint8 [D, B/D, H, W, 3], label int32 [D, B/D], va float32
[D, B/D, 2], va_mask bool [D, B/D] and mask bool [D, B/D] (False on the
padding that completes the last evaluation batch). Normalisation happens on
the device.
"""

import functools
from typing import Iterator

import grain
import ml_collections
import numpy as np
from PIL import Image

from fer_jax.data.affectnet import Records


def decode_image(path: str, image_size: int) -> np.ndarray:
  """The image at path as uint8 RGB [image_size, image_size, 3]."""
  try:
    with Image.open(path) as image:
      image = image.convert('RGB')
      if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size),
                             Image.Resampling.BILINEAR)
      return np.asarray(image)
  except OSError as e:
    raise ValueError(f'{path}: cannot decode image: {e}') from e


def _load(record: dict, image_size: int) -> dict:
  return {'image': decode_image(record['path'], image_size),
          'label': record['label'], 'va': record['va'],
          'va_mask': record['va_mask'], 'mask': np.True_}


def random_crop(image: np.ndarray, rng: np.random.Generator,
                min_scale: float) -> np.ndarray:
  """A square crop of side U(min_scale, 1) x size, resized back to size."""
  size = image.shape[0]
  side = int(round(size * rng.uniform(min_scale, 1.0)))
  if side >= size:
    return image
  y, x = rng.integers(0, size - side + 1, 2)
  crop = Image.fromarray(image[y:y + side, x:x + side])
  return np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR))


def _load_augmented(record: dict, rng: np.random.Generator, image_size: int,
                    flip: bool, crop_min_scale: float) -> dict:
  example = _load(record, image_size)
  if crop_min_scale < 1:
    example['image'] = random_crop(example['image'], rng, crop_min_scale)
  if flip and rng.random() < 0.5:
    example['image'] = example['image'][:, ::-1]
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


def train_batches(records: Records, config: ml_collections.ConfigDict,
                  epoch: int, num_devices: int) -> Iterator[dict]:
  """Epoch `epoch` (0-based) of shuffled, augmented training batches.

  data.sampler 'uniform': a seeded permutation that differs per epoch
  (Grain folds the epoch into the seed); 'balanced': as many draws with
  replacement, each class equally likely (for class imbalance). Either way
  the order depends only on (train.seed, epoch), so a run resumed at an
  epoch boundary sees exactly the batches an uninterrupted run would.
  """
  n, batch_size = len(records), config.train.batch_size
  if batch_size % num_devices:
    raise ValueError(f'train.batch_size: {batch_size} is not divisible by '
                     f'{num_devices} devices')
  load = functools.partial(_load_augmented, image_size=config.data.image_size,
                           flip=config.data.random_flip,
                           crop_min_scale=config.data.crop_min_scale)
  if config.data.sampler == 'uniform':
    ds = (grain.MapDataset.source(records).seed(config.train.seed).shuffle()
          .random_map(load).repeat(config.train.num_epochs))
    ds = ds[epoch * n:(epoch + 1) * n]
  elif config.data.sampler == 'balanced':
    rng = np.random.default_rng([config.train.seed, epoch])
    epoch_records = records.subset(balanced_indices(records.labels, n, rng))
    ds = (grain.MapDataset.source(epoch_records)
          .seed(int(rng.integers(2**31))).random_map(load))
  else:
    raise ValueError(f"data.sampler: {config.data.sampler!r} is not "
                     "'uniform' or 'balanced'")
  ds = (ds.batch(batch_size, drop_remainder=True)
        .map(functools.partial(_shard, num_devices=num_devices)))
  return iter(_read(ds, config.data))


def eval_batches(records: Records, config: ml_collections.ConfigDict,
                 num_devices: int) -> Iterator[dict]:
  """Every example exactly once, in order; the last batch padded and masked."""
  batch_size = config.train.eval_batch_size
  if batch_size % num_devices:
    raise ValueError(f'train.eval_batch_size: {batch_size} is not divisible '
                     f'by {num_devices} devices')
  ds = (grain.MapDataset.source(records)
        .map(functools.partial(_load, image_size=config.data.image_size))
        .batch(batch_size, drop_remainder=False)
        .map(functools.partial(pad_and_shard, batch_size=batch_size,
                               num_devices=num_devices)))
  return iter(_read(ds, config.data))
