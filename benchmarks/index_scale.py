"""Indexing a Layout A set of AffectNet's size: first start and second start.

Builds SET/images and SET/annotations for N images (default 290,000, as
AffectNet's train_set; 4 annotation files each) out of hard links to a few
distinct files, so it takes seconds and little disk, then times
`affectnet.index_npy` with an empty cache (every annotation read, every
image decoded at 1/8 scale, in data.index_processes processes) and again
with the cache in place, and `index.to_records` (the label rules).

  python -m benchmarks.index_scale                     # 290,000 images
  python -m benchmarks.index_scale --num_images=20000 --processes=1
"""

import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from PIL import Image

from fer_jax.data import affectnet, index
from fer_jax.configs import default

FLAGS = flags.FLAGS
flags.DEFINE_integer('num_images', 290_000, 'Images in the set.')
flags.DEFINE_integer('processes', 0, 'data.index_processes (0: all cores).')
flags.DEFINE_string('folder', 'data/index_scale', 'Where to build the set '
                    '(removed at the end unless --keep).')
flags.DEFINE_bool('keep', False, 'Keep the set and its index.')

NUM_DISTINCT = 50  # distinct images and valence/arousal values


def _pools(folder: Path) -> dict[str, list[Path]]:
  """A few distinct files of each kind for the links to share (ext4 allows
  65,000 links to one file)."""
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  pools = {'jpg': [], 'exp': [], 'val': [], 'aro': [], 'lnd': []}
  for k in range(NUM_DISTINCT):
    noise = rng.integers(0, 256, (28, 28, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).resize((224, 224), Image.Resampling.BICUBIC).save(
        buffer, 'JPEG', quality=90)
    pools['jpg'].append(folder / f'{k}.jpg')
    pools['jpg'][-1].write_bytes(buffer.getvalue())
    for kind, value in (('val', f'{rng.uniform(-1, 1):.4f}'),
                        ('aro', f'{rng.uniform(-1, 1):.4f}'),
                        ('lnd', rng.uniform(0, 224, 136))):
      pools[kind].append(folder / f'{k}_{kind}.npy')
      np.save(pools[kind][-1], np.array(value))
  for code in range(11):
    pools['exp'].append(folder / f'code{code}_exp.npy')
    np.save(pools['exp'][-1], np.array(str(code)))
  return pools


def build(set_dir: Path, num_images: int) -> None:
  """Layout A with num_images non-contiguous IDs, all hard links."""
  pools = _pools(set_dir.parent / 'pool')
  images, annotations = set_dir / 'images', set_dir / 'annotations'
  images.mkdir(parents=True)
  annotations.mkdir()
  for i in range(num_images):
    sample_id = 3 * i + 7
    os.link(pools['jpg'][i % NUM_DISTINCT], images / f'{sample_id}.jpg')
    for kind in ('exp', 'val', 'aro', 'lnd'):
      pool = pools[kind]
      os.link(pool[(i * 7 + 3) % len(pool)],
              annotations / f'{sample_id}_{kind}.npy')


def main(argv):
  del argv
  folder = Path(FLAGS.folder)
  if folder.exists():
    shutil.rmtree(folder)
  set_dir = folder / 'train_set'
  start = time.perf_counter()
  build(set_dir, FLAGS.num_images)
  print(f'{FLAGS.num_images:,} images and {4 * FLAGS.num_images:,} '
        f'annotation files linked in {time.perf_counter() - start:.0f} s')
  data = default.get_config().data
  data.index_cache_dir = str(folder / 'index_cache')
  data.index_processes = FLAGS.processes
  processes = FLAGS.processes or os.cpu_count()
  for label in (f'first start ({processes} processes)', 'second start'):
    start = time.perf_counter()
    built = affectnet.index_npy(set_dir, data)
    print(f'index, {label}: {time.perf_counter() - start:.1f} s')
  start = time.perf_counter()
  records, report = index.to_records(built, 'raise')
  print(f'label rules: {time.perf_counter() - start:.2f} s; '
        f'{len(records):,} kept, dropped {report.dropped_classes}')
  cache = next((folder / 'index_cache').glob('*.npz'))
  print(f'cache: {cache.stat().st_size / 2**20:.0f} MiB')
  if not FLAGS.keep:
    shutil.rmtree(folder)


if __name__ == '__main__':
  app.run(main)
