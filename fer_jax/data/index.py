"""The index of a released set: every image with its raw annotations, cached.

Reading 290,000 images and their 1.2 million annotation files takes
minutes, so a set is indexed once, in parallel (data.index_processes), and
saved as one .npz in data.index_cache_dir. Its name hashes the reader's
settings and the listing of the set's files (name, size, modification
time): a changed, added or removed file means a new index. The label rules
and data.on_error apply after the cache (`to_records`), so changing them
needs no re-indexing.

An index is a dict of parallel arrays, one row per image file:
  path str [N]; code int16 [N] (expression 0..10, -1 unknown);
  va float32 [N, 2] (as stored; NaN when the layout has none);
  box float32 [N, 4] (x, y, w, h; NaN: the whole image);
  size int32 [N, 2] (width, height; 0 unless images are checked);
  mode, format str [N] (Pillow's); error str [N] ('' when readable);
  landmarks float32 [N, 68, 2], only for layouts that have them;
  pixels uint8 [N, H, W] or [N, H, W, 3], the images themselves, for
    layouts that ship pixels instead of files (FER2013's CSV);
  votes float32 [N, 8], annotators' votes per canonical expression, for
    layouts that have them (FERPlus).
Codes are canonical (fer_jax.labels): 0-7 the expressions, EXTRA_CODES
past them; a layout maps its own.
"""

import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from absl import logging
from PIL import Image

from fer_jax import labels as labels_lib
from fer_jax.errors import DataError

INDEX_VERSION = 1
# Image file names, and the format (Pillow's name) each suffix promises.
_SUFFIX_FORMATS = {'.jpg': 'JPEG', '.jpeg': 'JPEG', '.png': 'PNG',
                   '.bmp': 'BMP', '.webp': 'WEBP', '.tif': 'TIFF',
                   '.tiff': 'TIFF'}
IMAGE_SUFFIXES = tuple(_SUFFIX_FORMATS)
NUM_LANDMARKS = 68
_GREY_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'F')
# Pillow's names of the formats OpenCV decodes (MPO: multi-picture JPEG).
DECODED_FORMATS = ('JPEG', 'MPO', 'PNG', 'BMP', 'WEBP', 'TIFF')
# Pillow refuses images past twice its limit (about 179 megapixels by
# default) as possible decompression bombs; OpenCV, which decodes them,
# past 2**30 pixels (CV_IO_MAX_IMAGE_PIXELS). The same limit for both: an
# image is readable or not, whoever reads it.
Image.MAX_IMAGE_PIXELS = 2 ** 29
warnings.simplefilter('ignore', Image.DecompressionBombWarning)
# Indexing in worker processes pays off only past their start-up time.
_MIN_PARALLEL_JOBS = 2000


@dataclasses.dataclass(frozen=True)
class Records:
  """One split: image paths with their labels, as parallel arrays."""
  paths: np.ndarray       # str [N]
  labels: np.ndarray      # int32 [N], positions in the run's classes
  va: np.ndarray          # float32 [N, 2]; 0 where masked
  va_mask: np.ndarray     # bool [N]: valence and arousal both valid
  boxes: np.ndarray       # float32 [N, 4] face (x, y, w, h); NaN: whole image
  landmarks: np.ndarray | None = None  # float32 [N, 68, 2]; NaN if absent
  # uint8 [N, S, S, 3]: the base images, decoded once (pipeline.hold_decoded)
  images: np.ndarray | None = None
  # uint8 [N, H, W(, 3)]: the stored images, for layouts without files
  pixels: np.ndarray | None = None
  # float32 [N, K]: target distributions over the run's classes (FERPlus's
  # votes under data.ferplus_labels='probability')
  soft: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> dict:
    record = {'path': self.paths[i], 'label': self.labels[i],
              'va': self.va[i], 'va_mask': self.va_mask[i],
              'box': self.boxes[i]}
    for key, values in (('image', self.images), ('pixels', self.pixels),
                        ('soft', self.soft)):
      if values is not None:
        record[key] = values[i]
    return record

  def subset(self, index: np.ndarray) -> 'Records':
    """The records at the given positions."""
    return Records(*(None if v is None else v[index]
                     for v in dataclasses.astuple(self)))

  def without_landmarks(self) -> 'Records':
    """The same records without landmarks (lighter to send to workers)."""
    return dataclasses.replace(self, landmarks=None)


def reason_kind(reason: str) -> str:
  """A skipped file's reason without where and which: the locations that
  lead it ('path:line: ') and quoted values removed, numbers as N, so that
  reasons can be counted ('image file missing': 12)."""
  parts = reason.split(': ')
  while len(parts) > 1 and (os.sep in parts[0] or re.search(
      r'\.\w+:\d+$', parts[0]) or re.search(r'\.\w+$', parts[0])):
    parts = parts[1:]
  kind = re.sub(r"'[^']*'|\"[^\"]*\"", '...', ': '.join(parts))
  return re.sub(r'\d+(\.\d+)?', 'N', kind)


@dataclasses.dataclass
class SourceReport:
  """What reading one released set kept, dropped and skipped."""
  dropped_classes: dict  # {code name: count}
  skipped: list          # [{path, reason}]
  image_notes: dict      # greyscale, suffix_mismatch, sizes of kept images


def row(path: str, code: int = -1, va=(np.nan, np.nan), box=None,
        landmarks=None, image: tuple = (0, 0, '', ''),
        error: str = '', pixels=None, votes=None) -> dict:
  """One image's index row; image is (width, height, mode, format)."""
  return {'path': str(path), 'code': code, 'va': va,
          'box': np.full(4, np.nan) if box is None else box,
          'landmarks': landmarks, 'image': image, 'error': error,
          'pixels': pixels, 'votes': votes}


def check_image(path: str) -> tuple[int, int, str, str]:
  """(width, height, mode, format) of a fully decodable image, else raises.

  JPEGs decode at 1/8 scale (the whole file is still read, so truncation
  and corruption show). Formats OpenCV cannot decode (GIF, TGA, ICO, ...)
  are refused here rather than in the middle of training.
  """
  try:
    with Image.open(path) as image:
      info = (*image.size, image.mode, image.format or '')
      image.draft('RGB', (max(1, info[0] // 8), max(1, info[1] // 8)))
      image.load()
  except FileNotFoundError:
    raise ValueError(f'{path}: image file missing') from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError
          ) as e:
    raise ValueError(f'{path}: not a readable image: {e}') from e
  if info[3] not in DECODED_FORMATS:  # training decodes with OpenCV
    raise ValueError(f'{path}: {info[3] or "unknown"} images are not '
                     f'supported (only {", ".join(DECODED_FORMATS)})')
  return info


def image_info(path: str, check: bool) -> tuple[int, int, str, str]:
  """check_image's answer, or only whether the file exists."""
  if check:
    return check_image(path)
  if not os.path.isfile(path):
    raise ValueError(f'{path}: image file missing')
  return 0, 0, '', ''


def listing_key(settings: dict, files: Iterable[os.DirEntry | str]) -> str:
  """A hash of settings and every file's name, size and modification time."""
  digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
  for f in files:
    try:
      stat = f.stat() if isinstance(f, os.DirEntry) else os.stat(f)
      entry = f'{os.fspath(f)}\0{stat.st_size}\0{stat.st_mtime_ns}\n'
    except FileNotFoundError:
      entry = f'{os.fspath(f)}\0missing\n'
    digest.update(entry.encode())
  return digest.hexdigest()[:16]


def cache_name(path: Path) -> str:
  """A readable name for a set's index: its parent folder and its own."""
  parts = Path(path).absolute().parts[-2:]
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', '_'.join(parts))


def _columns(rows: list[dict], with_landmarks: bool) -> dict:
  n = len(rows)
  index = {
      'path': np.array([r['path'] for r in rows], dtype=str),
      'code': np.array([r['code'] for r in rows], np.int16).reshape(n),
      'va': np.array([r['va'] for r in rows], np.float32).reshape(n, 2),
      'box': np.array([r['box'] for r in rows], np.float32).reshape(n, 4),
      'size': np.array([r['image'][:2] for r in rows], np.int32).reshape(
          n, 2),
      'mode': np.array([r['image'][2] for r in rows], dtype=str),
      'format': np.array([r['image'][3] for r in rows], dtype=str),
      'error': np.array([r['error'] for r in rows], dtype=str),
  }
  if with_landmarks:
    missing = np.full((NUM_LANDMARKS, 2), np.nan)
    index['landmarks'] = np.array(
        [missing if r['landmarks'] is None else r['landmarks'] for r in rows],
        np.float32).reshape(n, NUM_LANDMARKS, 2)
  for field, dtype in (('pixels', np.uint8), ('votes', np.float32)):
    given = [r[field] for r in rows if r.get(field) is not None]
    if given:  # rows without (errors) get zeros of the same shape
      blank = np.zeros_like(np.asarray(given[0], dtype))
      index[field] = np.array([blank if r.get(field) is None else r[field]
                               for r in rows], dtype)
  return index


def parallel_map(parse: Callable, jobs: list, processes: int) -> list:
  """[parse(job) for job in jobs], over worker processes when it pays."""
  processes = processes or os.cpu_count() or 1
  if processes == 1 or len(jobs) < _MIN_PARALLEL_JOBS:
    return [parse(job) for job in jobs]
  chunk = max(1, min(512, len(jobs) // (8 * processes)))
  with multiprocessing.get_context('spawn').Pool(processes) as pool:
    return pool.map(parse, jobs, chunksize=chunk)


def cached_index(name: str, key: str, cache_dir: str, build: Callable[[], list],
                 with_landmarks: bool) -> dict:
  """The index saved under this key, or build() indexed and saved."""
  path = Path(cache_dir) / f'{name}_{key}.npz'
  if path.exists():
    with np.load(path, allow_pickle=False) as saved:
      logging.info('Index of %s read from %s', name, path)
      return dict(saved)
  logging.info('Indexing %s (cached as %s) ...', name, path)
  index = _columns(build(), with_landmarks)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.name + f'.{os.getpid()}.tmp.npz')
  np.savez(partial, **index)
  partial.replace(path)  # a complete index or none
  return index


def _image_notes(index: dict, keep: np.ndarray) -> dict:
  """What the kept images are: greyscale, mis-named, their sizes."""
  notes = {'greyscale': int(np.isin(index['mode'][keep], _GREY_MODES).sum())}
  suffixes = [os.path.splitext(p)[1].lower() for p in index['path'][keep]]
  notes['suffix_mismatch'] = int(sum(
      bool(f) and _SUFFIX_FORMATS.get(s) != f
      for s, f in zip(suffixes, index['format'][keep])))
  sizes, counts = np.unique(index['size'][keep], axis=0, return_counts=True)
  order = np.argsort(-counts, kind='stable')[:5]
  notes['most_common_sizes'] = {f'{w}x{h}': int(c) for (w, h), c in zip(
      sizes[order], counts[order]) if w}
  return notes


def to_records(index: dict, on_error: str,
               classes: tuple[str, ...] = labels_lib.EXPRESSIONS
               ) -> tuple[Records, SourceReport]:
  """The label rules (docs/datasets.md) applied to an index.

  Rows with an error raise (on_error='raise', the first one in path order)
  or are skipped and listed ('skip'). A row whose code is not one of
  `classes` (the run's label space; EXTRA_CODES never are) is dropped and
  counted by the code's name; the others get their position in classes.
  A valence or arousal that is missing, -2 or outside [-1, 1] masks both
  out of the VA loss and metrics while the class label stays.
  """
  if on_error not in ('raise', 'skip'):
    raise ValueError(f"data.on_error: {on_error!r} is not 'raise' or 'skip'")
  bad = index['error'] != ''
  if bad.any() and on_error == 'raise':
    raise DataError(str(index['error'][np.flatnonzero(bad)[0]]) +
                    ' (data.on_error=skip drops such files and lists them '
                    'in data_report.json)')
  skipped = [{'path': str(p), 'reason': str(e)}
             for p, e in zip(index['path'][bad], index['error'][bad])]
  codes = index['code'].astype(np.int64)
  position = np.full(max(labels_lib.EXTRA_CODES) + 1, -1)
  position[[labels_lib.EXPRESSIONS.index(c) for c in classes]] = np.arange(
      len(classes))
  labels = np.where(codes >= 0,
                    position[np.clip(codes, 0, len(position) - 1)], -1)
  outside = ~bad & (labels < 0)
  names, counts = np.unique(codes[outside], return_counts=True)
  dropped = {labels_lib.code_name(int(c)): int(n)
             for c, n in zip(names, counts)}
  keep = np.flatnonzero(~bad & ~outside)
  va = index['va'][keep]
  with np.errstate(invalid='ignore'):
    valid = np.all(np.abs(va) <= 1, axis=1)  # False for NaN and -2
  optional = lambda field: index[field][keep] if field in index else None
  records = Records(
      paths=index['path'][keep], labels=labels[keep].astype(np.int32),
      va=np.where(valid[:, None], va, 0).astype(np.float32), va_mask=valid,
      boxes=index['box'][keep], landmarks=optional('landmarks'),
      pixels=optional('pixels'), soft=_soft_targets(optional('votes'),
                                                    classes))
  return records, SourceReport(dropped, skipped, _image_notes(index, keep))


def _soft_targets(votes: np.ndarray | None, classes: tuple[str, ...]
                  ) -> np.ndarray | None:
  """Votes [N, 8] as distributions over classes [N, K] (None: no votes)."""
  if votes is None:
    return None
  votes = votes[:, [labels_lib.EXPRESSIONS.index(c) for c in classes]]
  return (votes / np.maximum(votes.sum(1, keepdims=True), 1e-12)).astype(
      np.float32)
