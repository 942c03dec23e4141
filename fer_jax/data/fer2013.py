"""FER2013 (ROOT/fer2013.csv) and FERPlus's votes for it (fer2013new.csv).

fer2013.csv holds every face itself: 48x48 grey values as a string of
2,304 numbers, with FER2013's label and its Usage (Training -> train,
PublicTest -> val, PrivateTest -> test). fer2013new.csv's rows line up one
to one with those and give 10 annotators' votes over 8 expressions,
unknown and NF (not a face). A row's path is CSV:line; a bad row becomes
its row's error, never a label.

FERPlus is also read as its own scripts leave it: ROOT/FER2013Train/,
FER2013Valid/ and FER2013Test/, each with its PNGs and a label.csv (no
header) whose rows are 'fer0000000.png,"(0, 0, 48, 48)",4,0,0,1,3,2,0,0,0,0':
the image, its face box (always the whole image; not read) and the 10
votes. There a row's path is its image.

Which votes make a training row's label and target is FERPlus's own
choice of four (data.ferplus_labels, vote_label); validation and test
are labelled by majority.
"""

import csv
import functools
import math
import os
from pathlib import Path
from typing import Callable

import ml_collections
import numpy as np

from fer_jax.data import index as index_lib
from fer_jax.data.affectnet import parse_number
from fer_jax.data.index import row
from fer_jax.labels import NUM_CLASSES

SIDE = 48  # pixels a side
GREY_IMAGE = (SIDE, SIDE, 'L', '')  # the index's (width, height, mode, format)
USAGE_SPLITS = {'Training': 'train', 'PublicTest': 'val',
                'PrivateTest': 'test'}
SPLITS = ('train', 'val', 'test')
FER_COLUMNS = ('emotion', 'pixels', 'Usage')
# FER2013's 0 Angry, 1 Disgust, 2 Fear, 3 Happy, 4 Sad, 5 Surprise,
# 6 Neutral -> canonical codes (fer_jax.labels).
FER_CODES = (6, 5, 4, 1, 2, 3, 0)
VOTE_COLUMNS = ('neutral', 'happiness', 'surprise', 'sadness', 'anger',
                'disgust', 'fear', 'contempt', 'unknown', 'NF')
FERPLUS_COLUMNS = ('Usage', 'Image name') + VOTE_COLUMNS
# Each vote column's canonical code: 8 expressions, 11 Unknown, 10 No-Face.
VOTE_CODES = (0, 1, 3, 2, 6, 5, 4, 7, 11, 10)
NO_FACE, NO_MAJORITY = 10, 12
# data.ferplus_labels: FERPlus's training modes (its src/ferplus.py and
# src/train.py, github.com/microsoft/FERPlus at ae2128ab).
FERPLUS_LABELS = ('majority', 'probability', 'crossentropy', 'multi_target')
# The version of those rules, part of the index's cache key: 1 had a
# 'probability' mode of its own (the vote distribution as the target,
# under another rule for which rows to keep).
FERPLUS_RULES = 2
# FERPlus's fixed shares: probability and crossentropy take top columns
# until they hold 75% of the votes or 3 columns; multi_target keeps the
# columns with 30% of the votes.
LEADING_SHARE, LEADING_COLUMNS = 0.75, 3
MULTI_TARGET_SHARE = 0.3
_LAYOUT = ('FER2013 needs ROOT/fer2013.csv; FERPlus also '
           'ROOT/fer2013new.csv')
# FERPlus's folders (its generate_training_data.py) and their splits.
FOLDERS = {'train': 'FER2013Train', 'val': 'FER2013Valid',
           'test': 'FER2013Test'}
LABEL_FILE = 'label.csv'
_FERPLUS_LAYOUTS = ('FERPlus needs ROOT/fer2013new.csv beside '
                    'ROOT/fer2013.csv, or the folders FERPlus generates: '
                    f'ROOT/{"/, ".join(FOLDERS.values())}/, each with its '
                    f'images and {LABEL_FILE}')


def read_rows(path: Path, layout: str = _LAYOUT) -> list[tuple]:
  """(path:line, values) for every CSV row, blank ones included."""
  if not path.is_file():
    raise FileNotFoundError(f'{path}: file not found ({layout})')
  with open(path, newline='', encoding='utf-8-sig') as f:
    reader = csv.reader(f)
    try:
      return [(f'{path}:{reader.line_num}', values) for values in reader]
    except UnicodeDecodeError as e:
      raise ValueError(f'{path}: not UTF-8 text ({e.reason})') from None
    except csv.Error as e:
      raise ValueError(f'{path}:{reader.line_num}: {e}') from None


def _blank(values: list[str]) -> bool:
  return not any(v.strip() for v in values)


def read_table(path: Path, columns: tuple[str, ...]) -> list[tuple]:
  """(path:line, {column: value}) for each non-blank row under the header."""
  rows = read_rows(path)
  header = [h.strip() for h in (rows[0][1] if rows else [])]
  missing = [c for c in columns if c not in header]
  if missing:
    raise ValueError(f'{path}: missing columns {missing} (has '
                     f'{[h[:40] for h in header[:len(columns) + 2]]})')
  position = {c: header.index(c) for c in columns}
  return [(where, {c: values[i] if i < len(values) else ''
                   for c, i in position.items()})
          for where, values in rows[1:] if not _blank(values)]


def parse_label(value: str, where: str, labels: range) -> int:
  """An integer in labels (given as a number), or a ValueError."""
  number = parse_number(value.strip(), where)
  if number not in labels:
    raise ValueError(f'{where}: {value.strip()!r} not in '
                     f'{labels[0]}..{labels[-1]}')
  return int(number)


def _is_grey(value: str) -> bool:
  return value.isascii() and value.isdigit() and int(value) <= 255


def parse_pixels(text: str, where: str) -> np.ndarray:
  """The uint8 [48, 48] face of a pixels field: 2,304 values 0..255."""
  values = text.split()
  if len(values) != SIDE * SIDE:
    raise ValueError(f'{where}: pixels: expected {SIDE * SIDE} grey values, '
                     f'found {len(values)}')
  try:  # loadtxt reads a line of numbers 4x faster than int() on each
    pixels = np.loadtxt([' '.join(values)], np.int64, comments=None)
  except ValueError:
    pixels = None
  if pixels is None or pixels.min() < 0 or pixels.max() > 255:
    bad = next(v for v in values if not _is_grey(v))
    raise ValueError(f'{where}: pixels: {bad!r} is not a grey value 0..255')
  return pixels.astype(np.uint8).reshape(SIDE, SIDE)


def _split(fields: dict, where: str) -> str:
  usage = fields['Usage'].strip()
  if usage not in USAGE_SPLITS:
    raise ValueError(f'{where}: Usage {usage!r} is not one of '
                     f'{", ".join(USAGE_SPLITS)}')
  return USAGE_SPLITS[usage]


def parse_fer_row(job: tuple) -> dict:
  """The index row of one fer2013.csv row."""
  where, fields = job
  try:
    _split(fields, where)
    code = FER_CODES[parse_label(fields['emotion'], f'{where}: emotion',
                                 range(7))]
    pixels = parse_pixels(fields['pixels'], where)
  except ValueError as e:
    return row(where, error=str(e))
  return row(where, code, image=GREY_IMAGE, pixels=pixels)


def cached_splits(name: str, key: str, build: Callable[[], dict],
                  data: ml_collections.ConfigDict) -> dict[str, dict]:
  """Each split's index, cached; build() ({split: rows}) runs at most once."""
  built = {}

  def split_rows(split: str) -> list[dict]:
    if not built:
      built.update(build())
    return built[split]

  return {split: index_lib.cached_index(
      f'{name}_{split}', key, data.index_cache_dir,
      functools.partial(split_rows, split), False) for split in SPLITS}


def _by_usage(rows: list[tuple], parsed: list[dict]) -> dict[str, list]:
  """Rows by their Usage's split; an unknown Usage's error goes to train."""
  splits = {split: [] for split in SPLITS}
  for (_, fields), parsed_row in zip(rows, parsed):
    splits[USAGE_SPLITS.get(fields['Usage'].strip(), 'train')].append(
        parsed_row)
  return splits


def index_fer2013(root: Path, data: ml_collections.ConfigDict
                  ) -> dict[str, dict]:
  """The indexes of fer2013.csv's splits: {'train', 'val', 'test'}."""
  path = root / 'fer2013.csv'
  if not path.is_file():
    raise FileNotFoundError(f'{path}: file not found ({_LAYOUT})')
  settings = {'layout': 'fer2013', 'version': index_lib.INDEX_VERSION}

  def build() -> dict[str, list]:
    rows = read_table(path, FER_COLUMNS)
    return _by_usage(rows, index_lib.parallel_map(
        parse_fer_row, rows, data.index_processes))

  return cached_splits(index_lib.cache_name(path),
                       index_lib.listing_key(settings, [str(path)]), build,
                       data)


# FERPlus --------------------------------------------------------------------

def parse_votes(fields: dict, where: str) -> np.ndarray:
  """The 10 vote counts of a fer2013new.csv row, in VOTE_COLUMNS order."""
  counts = []
  for column in VOTE_COLUMNS:
    count = parse_number(fields[column].strip(), f'{where}: {column}')
    if not math.isfinite(count) or count < 0 or count != int(count):
      raise ValueError(f'{where}: {column}: {fields[column].strip()!r} is '
                       'not a vote count')
    counts.append(count)
  if not any(counts):
    raise ValueError(f'{where}: no votes')
  return np.array(counts, np.float32)


def without_outliers(counts: np.ndarray) -> np.ndarray:
  """The counts (float64) with single votes removed (the FERPlus paper's
  outliers)."""
  counts = np.asarray(counts, np.float64)  # FERPlus's thresholds: float64
  return np.where(counts > 1, counts, 0)


def majority_votes(counts: np.ndarray) -> np.ndarray | None:
  """The top column's votes alone, when it holds more than half of them."""
  top = int(np.argmax(counts))
  if counts[top] <= counts.sum() / 2:
    return None
  kept = np.zeros_like(counts)
  kept[top] = counts[top]
  return kept


def leading_votes(counts: np.ndarray) -> np.ndarray | None:
  """The votes of the top columns, taken a tied group at a time from the
  highest count down, until they hold LEADING_SHARE of the votes or
  LEADING_COLUMNS columns.

  An unknown or NF column in a group ends the taking: it is taken itself
  only if no expression came before it (so the row is dropped). None when
  what was taken holds at most half of the votes or more than
  LEADING_COLUMNS columns (a group of ties can overshoot them).
  """
  total, kept = counts.sum(), np.zeros_like(counts)
  for count in np.unique(counts[counts > 0])[::-1]:
    if (kept.sum() >= LEADING_SHARE * total or
        np.count_nonzero(kept) >= LEADING_COLUMNS):
      break
    tied = np.flatnonzero(counts == count)
    expressions = tied[tied < NUM_CLASSES]
    kept[expressions] = count
    if len(expressions) < len(tied):
      if not kept.any():
        kept[tied[len(expressions)]] = count
      break
  if kept.sum() <= total / 2 or np.count_nonzero(kept) > LEADING_COLUMNS:
    return None
  return kept


def multi_target_votes(counts: np.ndarray) -> np.ndarray | None:
  """The votes of every column with at least MULTI_TARGET_SHARE of them,
  when together they hold more than half."""
  kept = np.where(counts >= MULTI_TARGET_SHARE * counts.sum(), counts, 0)
  return kept if kept.sum() > counts.sum() / 2 else None


# What each data.ferplus_labels mode keeps of a row's votes (without
# outliers): probability draws its label from the distribution that
# crossentropy trains on, so the two keep the same rows.
KEPT_VOTES = {'majority': majority_votes, 'probability': leading_votes,
              'crossentropy': leading_votes,
              'multi_target': multi_target_votes}


def vote_label(counts: np.ndarray, mode: str
               ) -> tuple[int, np.ndarray | None]:
  """A row's code and, unless in majority mode, the votes its target is
  made of (the 8 expressions, canonical order), as FERPlus's mode has them.

  The code is the kept column with the most votes, the first in
  VOTE_COLUMNS' order on a tie; a row the mode's rule rejects is
  No-Majority.
  """
  kept = KEPT_VOTES[mode](without_outliers(counts))
  if kept is None:
    return NO_MAJORITY, None
  code = VOTE_CODES[int(np.argmax(kept))]
  if mode == 'majority' or code >= NUM_CLASSES:
    return code, None
  votes = np.zeros(NUM_CLASSES, np.float32)
  votes[list(VOTE_CODES[:NUM_CLASSES])] = kept[:NUM_CLASSES]
  return code, votes


def parse_ferplus_row(job: tuple) -> dict:
  """The index row of one fer2013new.csv row with its fer2013.csv pixels."""
  where, fields, pixel_where, pixel_text, mode = job
  try:
    _split(fields, where)
    if not fields['Image name'].strip():
      # FERPlus blanks the name of the images it removed, and its own
      # script writes no file for them: every such row of the release has
      # all 10 votes on NF, so they are dropped as No-Face.
      return row(where, NO_FACE)
    code, votes = vote_label(parse_votes(fields, where), mode)
    if code >= NUM_CLASSES:
      return row(where, code)  # dropped: the pixels do not matter
    pixels = parse_pixels(pixel_text, pixel_where)
  except ValueError as e:
    return row(where, error=str(e))
  return row(where, code, image=GREY_IMAGE, pixels=pixels, votes=votes)


def ferplus_jobs(new_path: Path, fer_path: Path, mode: str) -> list[tuple]:
  """One parse_ferplus_row job per fer2013new.csv row, checked against
  fer2013.csv's (same count, same Usage). Only Training takes the mode:
  validation and test are labelled by majority, as FERPlus's own training
  script scores them.
  """
  votes, faces = read_table(new_path, FERPLUS_COLUMNS), read_table(
      fer_path, ('pixels', 'Usage'))
  if len(votes) != len(faces):
    raise ValueError(f'{new_path}: {len(votes)} rows, but {fer_path} has '
                     f'{len(faces)}: the two must line up row for row')
  jobs = []
  for (where, fields), (pixel_where, face) in zip(votes, faces):
    usage = fields['Usage'].strip()
    if usage != face['Usage'].strip():
      raise ValueError(f'{where}: Usage {usage!r}, but {pixel_where} has '
                       f"{face['Usage'].strip()!r}: the files do not line up")
    jobs.append((where, fields, pixel_where, face['pixels'],
                 mode if usage == 'Training' else 'majority'))
  return jobs


def parse_label_row(job: tuple) -> dict:
  """The index row of one label.csv row of FERPlus's folders."""
  where, folder, values, mode, check = job
  name = values[0].strip()
  if len(values) not in (11, 12):  # older copies of its script wrote no box
    return row(where, error=f'{where}: expected an image name, its face '
               f'box and 10 vote counts, found {len(values)} fields')
  if not name:
    return row(where, error=f'{where}: no image name')
  image = str(Path(folder) / name)
  try:
    code, votes = vote_label(parse_votes(
        dict(zip(VOTE_COLUMNS, values[-10:])), where), mode)
  except ValueError as e:
    return row(image, error=str(e))
  if code >= NUM_CLASSES:
    return row(image, code)  # dropped: the image does not matter
  try:
    info = index_lib.image_info(image, check)
  except ValueError as e:
    return row(image, error=f'{where}: {e}')
  return row(image, code, image=info, votes=votes)


def label_jobs(root: Path, mode: str, check: bool) -> dict[str, list]:
  """Each split's parse_label_row jobs, one per non-blank label.csv row.
  Only train takes the mode; val and test are labelled by majority."""
  return {split: [(where, str(root / folder), values,
                   mode if split == 'train' else 'majority', check)
                  for where, values in read_rows(
                      root / folder / LABEL_FILE, _FERPLUS_LAYOUTS)
                  if not _blank(values)]
          for split, folder in FOLDERS.items()}


def _index_folders(root: Path, mode: str, data: ml_collections.ConfigDict
                   ) -> dict[str, dict]:
  """The indexes of FERPlus's generated folders."""
  for folder in FOLDERS.values():
    if not (root / folder / LABEL_FILE).is_file():
      raise FileNotFoundError(f'{root / folder / LABEL_FILE}: file not '
                              f'found ({_FERPLUS_LAYOUTS})')
  settings = {'layout': 'ferplus_folders', 'ferplus_labels': mode,
              'ferplus_rules': FERPLUS_RULES,
              'version': index_lib.INDEX_VERSION,
              'check_images': data.check_images}
  files = [entry for folder in FOLDERS.values() for entry in sorted(
      os.scandir(root / folder), key=lambda e: e.name)]  # labels and images

  def build() -> dict[str, list]:
    return {split: index_lib.parallel_map(parse_label_row, jobs,
                                          data.index_processes)
            for split, jobs in label_jobs(root, mode,
                                          data.check_images).items()}

  return cached_splits(f'{index_lib.cache_name(root)}_ferplus_folders',
                       index_lib.listing_key(settings, files), build, data)


def index_ferplus(root: Path, data: ml_collections.ConfigDict
                  ) -> dict[str, dict]:
  """The indexes of FERPlus's splits: {'train', 'val', 'test'}, from
  fer2013new.csv and fer2013.csv or, without them, FERPlus's folders.

  data.ferplus_labels: one of FERPLUS_LABELS, for train (vote_label: the
  rows FERPlus's mode keeps, their codes and the votes their targets are
  made of); val and test are labelled by majority in every mode.
  """
  mode = data.ferplus_labels
  if mode not in FERPLUS_LABELS:
    raise ValueError(f'data.ferplus_labels: {mode!r} is not one of '
                     f"{', '.join(map(repr, FERPLUS_LABELS))}")
  new_path, fer_path = root / 'fer2013new.csv', root / 'fer2013.csv'
  if not new_path.is_file() and (
      root / FOLDERS['train'] / LABEL_FILE).is_file():
    return _index_folders(root, mode, data)
  for path in (new_path, fer_path):
    if not path.is_file():
      raise FileNotFoundError(f'{path}: file not found ({_FERPLUS_LAYOUTS})')
  settings = {'layout': 'ferplus', 'version': index_lib.INDEX_VERSION,
              'ferplus_labels': mode, 'ferplus_rules': FERPLUS_RULES}

  def build() -> dict[str, list]:
    jobs = ferplus_jobs(new_path, fer_path, mode)
    return _by_usage([job[:2] for job in jobs], index_lib.parallel_map(
        parse_ferplus_row, jobs, data.index_processes))

  key = index_lib.listing_key(settings, [str(new_path), str(fer_path)])
  return cached_splits(index_lib.cache_name(new_path), key, build, data)
