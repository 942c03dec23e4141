"""A generated AffectNet-style data set, written in Layout A like the release.

`ROOT/{train_set,val_set}/images/ID.jpg` and
`ROOT/{train_set,val_set}/annotations/ID_{exp,val,aro,lnd}.npy`, with the
expression, valence and arousal stored as numpy strings and IDs that are not
contiguous. The training set follows AffectNet's class frequencies, val_set
is balanced. Every sample is drawn from (seed, split, index) alone, so the
set is identical whatever the number of worker processes.
"""

import hashlib
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import ml_collections
import numpy as np
from absl import logging

from fer_jax.data import faces
from fer_jax.labels import NUM_CLASSES, VA_MISSING

GENERATOR_VERSION = 7
# AffectNet's manually annotated training set (Mollahosseini et al., 2017),
# in the order of EXPRESSIONS: Happy ~47%, Neutral ~26%, ...
TRAIN_CLASS_FREQUENCIES = np.array([26, 47, 9, 5, 2, 1.3, 9, 1.3])
SPLITS = ('train_set', 'val_set')
COMPLETE_MARKER = 'generator.json'


def class_counts(num_examples: int, balanced: bool) -> np.ndarray:
  """Examples per class summing to num_examples (largest remainders), >= 1."""
  if num_examples < NUM_CLASSES:
    raise ValueError(f'data.synthetic: {num_examples} images cannot hold '
                     f'all {NUM_CLASSES} classes')
  freq = np.ones(NUM_CLASSES) if balanced else TRAIN_CLASS_FREQUENCIES
  exact = freq / freq.sum() * num_examples
  counts = np.floor(exact).astype(int)
  remainders = np.argsort(counts - exact, kind='stable')
  counts[remainders[:num_examples - counts.sum()]] += 1
  while counts.min() == 0:  # a rare class in a tiny set: take from the largest
    counts[np.argmax(counts)] -= 1
    counts[np.argmin(counts)] += 1
  return counts


def generator_settings(config: ml_collections.ConfigDict) -> dict:
  """What determines the generated files; its hash names the cache folder."""
  s = config.data.synthetic
  return dict(version=GENERATOR_VERSION, num_train=s.num_train,
              num_val=s.num_val, image_size=s.image_size, seed=s.seed,
              va_missing_fraction=s.va_missing_fraction)


def dataset_root(config: ml_collections.ConfigDict) -> Path:
  """Where the generated set for this config lives."""
  settings = json.dumps(generator_settings(config), sort_keys=True)
  key = hashlib.sha1(settings.encode()).hexdigest()[:10]
  return Path(config.data.synthetic.cache_dir) / f'affectnet_synthetic_{key}'


def ensure_dataset(config: ml_collections.ConfigDict) -> Path:
  """Generates the set unless a complete copy exists; returns its root."""
  root = dataset_root(config)
  settings = generator_settings(config)
  marker = root / COMPLETE_MARKER
  if marker.exists() and not config.data.synthetic.regenerate:
    logging.info('Synthetic data set found at %s', root)
    return root
  if root.exists():
    shutil.rmtree(root)  # an interrupted or forced generation starts over
  logging.info('Generating the synthetic data set into %s ...', root)
  generate(root, **{k: v for k, v in settings.items() if k != 'version'},
           num_processes=config.data.synthetic.num_processes)
  marker.write_text(json.dumps(settings, indent=1))
  return root


def generate(root: Path, num_train: int, num_val: int, image_size: int,
             seed: int, va_missing_fraction: float,
             num_processes: int = 0) -> list[tuple]:
  """Writes train_set and val_set in Layout A under root.

  Returns what was written: (split, id, label, valence, arousal) per image.
  """
  rng = np.random.default_rng([seed, 999])
  total = num_train + num_val
  ids = rng.choice(10 * total, size=total, replace=False)
  jobs = []
  for split_index, (split, n, balanced) in enumerate(
      (('train_set', num_train, False), ('val_set', num_val, True))):
    labels = np.repeat(np.arange(NUM_CLASSES), class_counts(n, balanced))
    labels = np.random.default_rng([seed, split_index]).permutation(labels)
    split_ids = ids[:num_train] if split_index == 0 else ids[num_train:]
    for d in ('images', 'annotations'):
      (root / split / d).mkdir(parents=True, exist_ok=True)
    jobs += [(str(root / split), int(i), int(label), image_size,
              (seed, split_index, k), va_missing_fraction)
             for k, (i, label) in enumerate(zip(split_ids, labels))]
  processes = num_processes or os.cpu_count() or 1
  if processes == 1:
    return [_write_sample(job) for job in jobs]
  with multiprocessing.get_context('spawn').Pool(processes) as pool:
    return pool.map(_write_sample, jobs, chunksize=64)


def _write_sample(job) -> tuple:
  """Draws one face and writes its image and four annotation files."""
  split_dir, sample_id, label, image_size, key, va_missing_fraction = job
  rng = np.random.default_rng(key)
  va_missing = rng.random() < va_missing_fraction
  params = faces.draw_params(rng, label)
  jpeg, landmarks = faces.render(params, image_size)
  Path(split_dir, 'images', f'{sample_id}.jpg').write_bytes(jpeg)
  valence, arousal = ((VA_MISSING, VA_MISSING) if va_missing else
                      (params['valence'], params['arousal']))
  stem = os.path.join(split_dir, 'annotations', str(sample_id))
  # The release stores each value as a numpy unicode string.
  np.save(f'{stem}_exp.npy', np.array(str(label)))
  np.save(f'{stem}_val.npy', np.array(f'{valence:.6g}'))
  np.save(f'{stem}_aro.npy', np.array(f'{arousal:.6g}'))
  np.save(f'{stem}_lnd.npy', landmarks.reshape(-1).astype(np.float64))
  return (Path(split_dir).name, sample_id, label, valence, arousal)
