"""Throughput of the Grain training pipeline alone: decode + augment + batch.

Images per second, and per worker process, of `pipeline.train_batches` on
any configured data set (default: the synthetic set drawn at 224 px), for
each worker count and with the training augmentation on and off. Each
worker runs one decoding thread, so a worker is one core's worth of work.
Uncompressed uint8 batches come out, as the train step consumes them.

  python -m benchmarks.pipeline                        # 224 px, workers 0,1,2
  python -m benchmarks.pipeline --textured             # photograph-like files
  python -m benchmarks.pipeline --workers=0,4,8 --batches=50 \\
      --config.data.layout=npy --config.data.root=/data/affectnet
"""

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image

from fer_jax import data
from fer_jax.data import pipeline

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/default.py',
                                'Config whose data section is read.')
flags.DEFINE_integer('image_size', 224, 'data.image_size (and synthetic).')
flags.DEFINE_list('workers', ['0', '1', '2'], 'Worker process counts.')
flags.DEFINE_integer('batch_size', 32, 'Images per batch.')
flags.DEFINE_integer('warmup_batches', 5, 'Batches before timing starts.')
flags.DEFINE_integer('batches', 30, 'Timed batches.')
flags.DEFINE_string('output', '', 'Also write the rows here as JSON.')
flags.DEFINE_bool('textured', False,
                  'Re-encode the images with camera-like noise first: the '
                  'flat synthetic faces compress to ~5 KB at 224 px and '
                  'decode faster than photographs; these are ~15 KB.')

NO_AUGMENTATION = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                       flip=False, rotation_degrees=0.0, brightness=0.0,
                       contrast=0.0, saturation=0.0, erasing_prob=0.0)


def measure(records, config, num_workers: int) -> float:
  """Images/s over the timed batches, after the warm-up ones."""
  config.data.num_workers, config.data.num_threads = num_workers, 1
  batches = pipeline.train_batches(records, config, num_devices=1)
  for _ in range(FLAGS.warmup_batches):
    next(batches)
  start = time.perf_counter()
  for _ in range(FLAGS.batches):
    next(batches)
  seconds = time.perf_counter() - start
  batches.close()
  return FLAGS.batches * FLAGS.batch_size / seconds


def textured(records, folder: Path):
  """The records with their images re-encoded with noise, JPEG quality 90."""
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for k, path in enumerate(records.paths):
    rng = np.random.default_rng(k)
    image = np.asarray(Image.open(path).convert('RGB'), np.float64)
    noise = cv2.GaussianBlur(rng.normal(0, 25, image.shape), (0, 0), 1.5)
    noise += rng.normal(0, 6, image.shape)
    paths.append(str(folder / f'{k}.jpg'))
    Image.fromarray(np.clip(image + noise, 0, 255).astype(np.uint8)).save(
        paths[-1], quality=90)
  return dataclasses.replace(records, paths=np.array(paths))


def main(argv):
  del argv
  config = FLAGS.config
  config.data.image_size = FLAGS.image_size
  config.data.synthetic.image_size = FLAGS.image_size
  config.train.batch_size = FLAGS.batch_size
  config.data.sampler = 'uniform'
  records = data.load_splits(config)[0]['train']
  if FLAGS.textured:
    folder = Path(tempfile.mkdtemp())
    records = textured(records, folder)
  needed = (FLAGS.warmup_batches + FLAGS.batches) * FLAGS.batch_size
  config.train.num_epochs = -(-needed // len(records)) + 1
  rows = []
  for augment in (True, False):
    run_config = config.copy_and_resolve_references()
    if not augment:
      run_config.data.augment.update(NO_AUGMENTATION)
    for workers in map(int, FLAGS.workers):
      rate = measure(records, run_config, workers)
      rows.append({'image_size': FLAGS.image_size, 'augment': augment,
                   'textured': FLAGS.textured,
                   'num_workers': workers, 'images_per_sec': rate,
                   'images_per_sec_per_worker': rate / max(workers, 1)})
      print(f"{FLAGS.image_size} px, augment {'on ' if augment else 'off'}, "
            f'{workers} workers: {rate:7.0f} img/s, '
            f'{rate / max(workers, 1):7.0f} per worker', flush=True)
  if FLAGS.output:
    with open(FLAGS.output, 'w') as f:
      json.dump(rows, f, indent=1)
  if FLAGS.textured:
    shutil.rmtree(folder)


if __name__ == '__main__':
  app.run(main)
