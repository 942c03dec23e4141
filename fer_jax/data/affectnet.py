"""AffectNet's two releases: per-image .npy files (Layout A) and CSVs (B).

Layout A: SET/images/ID.jpg and SET/annotations/ID_{exp,val,aro,lnd}.npy,
each .npy holding one value (in the release a numpy string; numbers, 0-d
and 1-element arrays parse too) or, for lnd, 68 (x, y) points.
Layout B: training.csv / validation.csv with columns CSV_COLUMNS; image
paths relative to data.images_dir; the face is cropped by its box.
Both produce an index (fer_jax.data.index); a problem with one image
becomes its row's error, never a label.
"""

import csv
import math
import os
import re
from pathlib import Path

import ml_collections
import numpy as np

from fer_jax.data import index as index_lib
from fer_jax.data.index import IMAGE_SUFFIXES, NUM_LANDMARKS, row
from fer_jax.labels import NUM_CLASSES

CSV_COLUMNS = ('subDirectory_filePath', 'face_x', 'face_y', 'face_width',
               'face_height', 'facial_landmarks', 'expression', 'valence',
               'arousal')
_MAX_CODE = 10  # 8 None, 9 Uncertain, 10 No-Face (labels.EXTRA_CODES)


def parse_number(value, where: str) -> float:
  """float(value), or a ValueError naming where it came from."""
  try:
    return float(value)
  except (TypeError, ValueError):
    raise ValueError(f'{where}: {str(value)!r} is not a number') from None


def parse_code(value, where: str) -> int:
  """An expression code 0..10."""
  code = parse_number(value, where)
  if not math.isfinite(code) or code != int(code) or not 0 <= code <= (
      _MAX_CODE):
    raise ValueError(f'{where}: expression {code:g} not in 0..{_MAX_CODE}')
  return int(code)


def parse_landmarks(values, where: str) -> np.ndarray:
  """68 (x, y) points from 136 numbers or a string of them."""
  if isinstance(values, str):
    values = [v for v in re.split(r'[;,\s]+', values.strip()) if v]
  points = np.array([parse_number(v, where) for v in values], np.float32)
  if points.size != 2 * NUM_LANDMARKS or not np.all(np.isfinite(points)):
    raise ValueError(f'{where}: expected {2 * NUM_LANDMARKS} finite '
                     f'landmark coordinates, found {points.size}')
  return points.reshape(NUM_LANDMARKS, 2)


def _load_npy(path: str) -> np.ndarray:
  try:
    return np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise ValueError(f'{path}: annotation file missing') from None
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f'{path}: cannot read annotation: {e!r}') from e


def read_scalar(path: str) -> float:
  """The single number in an annotation file: a string, 0-d or 1-element."""
  value = _load_npy(path)
  if value.size != 1:
    raise ValueError(f'{path}: expected one value, found shape {value.shape}')
  item = value.reshape(-1)[0]
  return parse_number(item.decode() if isinstance(item, bytes) else item,
                      path)


def read_landmarks(path: str) -> np.ndarray | None:
  """The 68 points of an _lnd.npy file; None if there is no such file."""
  if not os.path.exists(path):
    return None
  value = _load_npy(path)
  if value.dtype.kind in 'SU':
    value = ' '.join(str(v.decode() if isinstance(v, bytes) else v)
                     for v in value.reshape(-1))
  return parse_landmarks(value if isinstance(value, str) else value.reshape(
      -1), path)


def parse_npy_row(job: tuple) -> dict:
  """The index row of one Layout A image."""
  image, stem, check = job
  try:
    code = parse_code(read_scalar(f'{stem}_exp.npy'), f'{stem}_exp.npy')
    if code >= NUM_CLASSES:
      return row(image, code)  # dropped: the rest of it does not matter
    va = (read_scalar(f'{stem}_val.npy'), read_scalar(f'{stem}_aro.npy'))
    landmarks = read_landmarks(f'{stem}_lnd.npy')
    info = index_lib.image_info(image, check)
  except ValueError as e:
    return row(image, error=str(e))
  return row(image, code, va, landmarks=landmarks, image=info)


def index_npy(set_dir: Path, data: ml_collections.ConfigDict) -> dict:
  """The index of one Layout A set (train_set or val_set)."""
  images, annotations = set_dir / 'images', set_dir / 'annotations'
  for folder in (images, annotations):
    if not folder.is_dir():
      raise FileNotFoundError(f'{folder}: folder not found (Layout A needs '
                              'images/ and annotations/)')
  image_files = sorted((e for e in os.scandir(images)
                        if e.name.lower().endswith(IMAGE_SUFFIXES)),
                       key=lambda e: e.name)
  annotation_files = sorted(os.scandir(annotations), key=lambda e: e.name)
  settings = {'layout': 'npy', 'version': index_lib.INDEX_VERSION,
              'check_images': data.check_images}
  key = index_lib.listing_key(settings, image_files + annotation_files)

  def build() -> list[dict]:
    stems = [os.path.splitext(e.name)[0] for e in image_files]
    jobs = [(e.path, os.path.join(annotations, stem), data.check_images)
            for e, stem in zip(image_files, stems)]
    rows = index_lib.parallel_map(parse_npy_row, jobs, data.index_processes)
    orphans = ({e.name[:-len('_exp.npy')] for e in annotation_files
                if e.name.endswith('_exp.npy')} - set(stems))
    return rows + [row(annotations / f'{s}_exp.npy', error=(
        f'{annotations / s}_exp.npy: annotation without an image in '
        f'{images}')) for s in sorted(orphans)]

  return index_lib.cached_index(index_lib.cache_name(set_dir), key,
                                data.index_cache_dir, build, True)


def parse_csv_row(job: tuple) -> dict:
  """The index row of one Layout B line."""
  where, image, fields, check = job
  try:
    code = parse_code(fields['expression'], f'{where}: expression')
    if code >= NUM_CLASSES:
      return row(image, code)  # dropped: the rest of it does not matter
    numbers = {k: parse_number(fields[k], f'{where}: {k}') for k in (
        'face_x', 'face_y', 'face_width', 'face_height', 'valence',
        'arousal')}
    box = np.array([numbers[k] for k in ('face_x', 'face_y', 'face_width',
                                         'face_height')])
    if not np.all(np.isfinite(box)) or box[2] <= 0 or box[3] <= 0:
      raise ValueError(f'{where}: face box {box.tolist()} has no area')
    text = fields['facial_landmarks'].strip()
    landmarks = parse_landmarks(text, f'{where}: facial_landmarks') if (
        text) else None
    info = index_lib.image_info(image, check)
    width, height = info[:2]
    if check and (box[0] >= width or box[1] >= height or
                  box[0] + box[2] <= 0 or box[1] + box[3] <= 0):
      raise ValueError(f'{where}: face box {box.tolist()} lies outside the '
                       f'{width}x{height} image {image}')
  except ValueError as e:
    return row(image, error=str(e))
  return row(image, code, (numbers['valence'], numbers['arousal']), box=box,
             landmarks=landmarks, image=info)


def read_csv_jobs(csv_path: Path, images_dir: Path, check: bool
                  ) -> list[tuple]:
  """One parse_csv_row job per data line of an AffectNet CSV."""
  if not csv_path.is_file():
    raise FileNotFoundError(f'{csv_path}: file not found (Layout B needs '
                            'training.csv and validation.csv)')
  with open(csv_path, newline='', encoding='utf-8-sig') as f:
    reader = csv.reader(f)
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
      raise ValueError(f'{csv_path}: missing columns {missing} (has {header})')
    position = {c: header.index(c) for c in CSV_COLUMNS}
    jobs = []
    for values in reader:
      line = reader.line_num  # the last line of a row spanning several
      if not values:
        continue
      fields = {c: values[i] if i < len(values) else ''
                for c, i in position.items()}
      image = images_dir / fields['subDirectory_filePath'].strip()
      jobs.append((f'{csv_path}:{line}', str(image), fields, check))
  return jobs


def index_csv(csv_path: Path, data: ml_collections.ConfigDict,
              images_dir: Path) -> dict:
  """The index of one Layout B CSV (training.csv or validation.csv)."""
  jobs = read_csv_jobs(csv_path, images_dir, data.check_images)
  settings = {'layout': 'csv', 'version': index_lib.INDEX_VERSION,
              'check_images': data.check_images, 'images': str(images_dir)}
  key = index_lib.listing_key(settings, [str(csv_path)] +
                              [job[1] for job in jobs])
  return index_lib.cached_index(
      index_lib.cache_name(csv_path), key, data.index_cache_dir,
      lambda: index_lib.parallel_map(parse_csv_row, jobs,
                                     data.index_processes), True)
