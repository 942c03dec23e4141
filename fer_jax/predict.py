"""--mode=predict: expressions and valence/arousal for image files.

predictions.csv goes to report/predict/<input>-step<N>[-flip]/, beside
(never over) the run's record.
"""

from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging

from fer_jax import config_rules, files, inference, workdir as workdir_lib
from fer_jax.config_rules import UsageError
from fer_jax.data import images, pipeline
from fer_jax.data.index import IMAGE_SUFFIXES, check_image
from fer_jax.labels import EXPRESSIONS


def list_images(input_path: str) -> list[Path]:
  """The image file at input_path, or every image below a folder, sorted."""
  path = Path(input_path)
  if path.is_file():
    return [path]
  if path.is_dir():
    return sorted(p for p in path.rglob('*')
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
  raise UsageError(f'--input: {input_path} is not a file or folder')


def _decoded(paths: list[Path], image_size: int, skipped: list[dict]):
  """(path, image) for the readable files; the rest recorded in skipped."""
  for path in paths:
    try:
      check_image(str(path))  # OpenCV would decode a truncated JPEG in part
      yield path, images.load(str(path), image_size)
    except (ValueError, OSError) as e:
      logging.warning('Skipping %s', e)
      skipped.append({'path': str(path), 'reason': str(e)})


def _batches(items, batch_size: int):
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == batch_size:
      yield batch
      batch = []
  if batch:
    yield batch


def predict(config: ml_collections.ConfigDict, workdir: str, input_path: str,
            checkpoint_step: int | None = None) -> Path:
  """Writes predictions.csv for the images at input_path; returns its path."""
  workdir = Path(workdir)
  config = inference.trained_config(config, workdir)
  config_rules.check(config, jax.device_count(), training=False)
  paths = list_images(input_path)
  if not paths:
    raise UsageError(f'--input: no images ({", ".join(IMAGE_SUFFIXES)})'
                     f' under {input_path}')
  state, p_eval, step = inference.restore(config, workdir, checkpoint_step)
  num_devices, batch_size = jax.local_device_count(), \
      config.train.eval_batch_size
  skipped, rows = [], []
  for chunk in _batches(_decoded(paths, config.data.image_size, skipped),
                        batch_size):
    n = len(chunk)
    batch = {'image': np.stack([image for _, image in chunk]),
             'label': np.zeros(n, np.int32), 'va': np.zeros((n, 2), np.float32),
             'va_mask': np.zeros(n, bool), 'mask': np.ones(n, bool)}
    batch = pipeline.pad_and_shard(batch, batch_size, num_devices)
    out = jax.device_get(p_eval(state, batch))
    probs = out['probs'].reshape(batch_size, -1)[:n]
    va = np.clip(out['va'].reshape(batch_size, 2)[:n], -1, 1)
    for (path, _), p, (valence, arousal) in zip(chunk, probs, va):
      label = int(p.argmax())
      rows.append([str(path), label, EXPRESSIONS[label],
                   *(f'{x:.6f}' for x in p), f'{valence:.6f}',
                   f'{arousal:.6f}'])
  input_name = Path(input_path).resolve().name or 'input'
  folder = workdir_lib.output_dir(
      workdir, 'predict', inference.output_name(input_name, step, config))
  output = folder / 'predictions.csv'
  files.write_csv(output, ['path', 'expression_id', 'expression',
                           *(f'prob_{name}' for name in EXPRESSIONS),
                           'valence', 'arousal'], rows)
  if skipped:
    files.write_csv(folder / 'skipped.csv', ['path', 'reason'],
                    [[item['path'], item['reason']] for item in skipped])
  print(f'Wrote {len(rows)} predictions to {output}')
  if skipped:
    print(f'Skipped {len(skipped)} unreadable files:')
    for item in skipped:
      print(f"  {item['path']}: {item['reason']}")
  return output
