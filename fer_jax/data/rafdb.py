"""RAF-DB basic: ROOT/EmoLabel/list_patition_label.txt (sic) and its images.

Each line of the list file names an image and its label ('train_00001.jpg
5'); the name's train_/test_ prefix gives the split. data.rafdb_images
picks ROOT/Image/aligned/<stem>_aligned.jpg (the 100x100 faces the
benchmark uses) or ROOT/Image/original/<stem>.jpg. A bad line becomes its
row's error, naming list file:line, never a label.
"""

import functools
import os
from pathlib import Path

import ml_collections

from fer_jax.data import index as index_lib
from fer_jax.data.affectnet import parse_number
from fer_jax.data.index import row

LIST_FILE = Path('EmoLabel') / 'list_patition_label.txt'
SPLITS = ('train', 'test')
# RAF-DB's 1 Surprise, 2 Fear, 3 Disgust, 4 Happiness, 5 Sadness, 6 Anger,
# 7 Neutral -> canonical codes (fer_jax.labels).
RAFDB_CODES = (3, 4, 5, 1, 2, 6, 0)
_LAYOUT = ('RAF-DB needs ROOT/EmoLabel/list_patition_label.txt and '
           'ROOT/Image/aligned/<name>_aligned.jpg or ROOT/Image/original/')


def read_text(path: Path) -> str:
  """A text file's contents (BOM dropped, newlines as '\\n')."""
  try:
    return path.read_text(encoding='utf-8-sig')
  except UnicodeDecodeError as e:
    raise ValueError(f'{path}: not UTF-8 text ({e.reason} at byte '
                     f'{e.start})') from None


def rafdb_code(label: str) -> int:
  """The canonical code of a RAF-DB label 1..7."""
  number = parse_number(label, 'label')
  if number not in range(1, 8):
    raise ValueError(f'label {label!r} not in 1..7')
  return RAFDB_CODES[int(number) - 1]


def parse_rafdb_row(job: tuple) -> dict:
  """The index row of one list file line."""
  where, image, label, error, check = job
  if error:  # the line names no usable image
    return row(where, error=error)
  try:
    code = rafdb_code(label)
    info = index_lib.image_info(image, check)
  except ValueError as e:
    return row(image, error=f'{where}: {e}')
  return row(image, code, image=info)


def read_list(list_path: Path, image_dir: Path, aligned: bool, check: bool
              ) -> dict[str, list]:
  """Each split's parse_rafdb_row jobs, one per non-blank line."""
  jobs = {split: [] for split in SPLITS}
  first_line = {}
  for line, text in enumerate(read_text(list_path).split('\n'), 1):
    fields = text.split()
    if not fields:
      continue
    where, name = f'{list_path}:{line}', fields[0]
    split = next((s for s in SPLITS if name.startswith(f'{s}_')), None)
    error = ''
    if len(fields) != 2:
      error = (f'{where}: expected "<image name> <label>", found '
               f'{len(fields)} fields')
    elif split is None:
      error = f'{where}: {name!r} starts with neither train_ nor test_'
    elif name in first_line:
      error = f'{where}: {name!r} listed again (line {first_line[name]})'
    else:
      first_line[name] = line
    stem = Path(name).stem
    image = image_dir / (f'{stem}_aligned.jpg' if aligned else f'{stem}.jpg')
    jobs[split or 'train'].append(
        (where, str(image), fields[-1], error, check))
  return jobs


def index_rafdb(root: Path, data: ml_collections.ConfigDict
                ) -> dict[str, dict]:
  """The indexes of RAF-DB basic's splits: {'train': ..., 'test': ...}."""
  if data.rafdb_images not in ('aligned', 'original'):
    raise ValueError(f'data.rafdb_images: {data.rafdb_images!r} is not '
                     "'aligned' or 'original'")
  list_path, image_dir = root / LIST_FILE, root / 'Image' / data.rafdb_images
  for path, found in ((list_path, list_path.is_file()),
                      (image_dir, image_dir.is_dir())):
    if not found:
      raise FileNotFoundError(f'{path}: not found ({_LAYOUT})')
  settings = {'layout': 'rafdb', 'version': index_lib.INDEX_VERSION,
              'check_images': data.check_images,
              'rafdb_images': data.rafdb_images}
  key = index_lib.listing_key(settings, [str(list_path)] + sorted(
      os.scandir(image_dir), key=lambda e: e.name))

  def build(split: str) -> list[dict]:
    jobs = read_list(list_path, image_dir, data.rafdb_images == 'aligned',
                     data.check_images)[split]
    return index_lib.parallel_map(parse_rafdb_row, jobs, data.index_processes)

  name = index_lib.cache_name(root)
  return {split: index_lib.cached_index(
      f'{name}_rafdb_{split}', key, data.index_cache_dir,
      functools.partial(build, split), False) for split in SPLITS}
