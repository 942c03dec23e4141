"""RAF-DB basic: ROOT/EmoLabel/list_patition_label.txt (sic) and its images.

Each line of the list file names an image and its label ('train_00001.jpg
5'); the name's train_/test_ prefix gives the split. data.rafdb_images
picks ROOT/Image/aligned/<stem>_aligned.jpg (the 100x100 faces the
benchmark uses, taken whole) or ROOT/Image/original/<stem>.jpg, the
photographs, each cropped by the face box the distribution ships in
ROOT/Annotation/boundingbox/<stem>_boundingbox.txt ('x1 y1 x2 y2': the
top-left and bottom-right corners in the photo's pixels) with
data.face_margin, as AffectNet's CSV boxes are. A bad line or box file
becomes its row's error, naming list file:line (and the box file), never
a label.
"""

import functools
import math
import os
from pathlib import Path

import ml_collections
import numpy as np

from fer_jax.data import index as index_lib
from fer_jax.data.affectnet import parse_number
from fer_jax.data.index import row

LIST_FILE = Path('EmoLabel') / 'list_patition_label.txt'
BOX_DIR = Path('Annotation') / 'boundingbox'
SPLITS = ('train', 'test')
# RAF-DB's 1 Surprise, 2 Fear, 3 Disgust, 4 Happiness, 5 Sadness, 6 Anger,
# 7 Neutral -> canonical codes (fer_jax.labels).
RAFDB_CODES = (3, 4, 5, 1, 2, 6, 0)
_LAYOUT = ('RAF-DB needs ROOT/EmoLabel/list_patition_label.txt and '
           'ROOT/Image/aligned/<name>_aligned.jpg or ROOT/Image/original/')
_BOXES = ("data.rafdb_images='original' crops each photo by its face box, "
          'ROOT/Annotation/boundingbox/<name>_boundingbox.txt as RAF-DB '
          "ships them; without them use 'aligned'")


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


def read_box(path: Path) -> np.ndarray:
  """The face box (x, y, w, h) of a box file holding 'x1 y1 x2 y2'."""
  try:
    fields = read_text(path).split()
  except FileNotFoundError:
    raise ValueError(f'{path}: face box file missing') from None
  except OSError as e:
    raise ValueError(f'{path}: unreadable ({e.strerror})') from None
  if len(fields) != 4:
    raise ValueError(f'{path}: expected "x1 y1 x2 y2", found '
                     f'{len(fields)} fields')
  numbers = [parse_number(v, str(path)) for v in fields]
  if not all(map(math.isfinite, numbers)):
    raise ValueError(f'{path}: face box {" ".join(fields)!r} is not four '
                     'finite numbers')
  x1, y1, x2, y2 = numbers
  if x2 <= x1 or y2 <= y1:
    raise ValueError(f'{path}: face box {[x1, y1, x2, y2]} (x1 y1 x2 y2) '
                     'has no area')
  return np.array([x1, y1, x2 - x1, y2 - y1], np.float32)


def _inside(box: np.ndarray, info: tuple, path: Path) -> None:
  """ValueError when box lies wholly outside its image (of checked size)."""
  width, height = info[:2]
  x, y, w, h = box.tolist()
  if width and (x >= width or y >= height or x + w <= 0 or y + h <= 0):
    raise ValueError(f'{path}: face box {[x, y, x + w, y + h]} (x1 y1 x2 '
                     f'y2) lies outside the {width}x{height} image')


def parse_rafdb_row(job: tuple) -> dict:
  """The index row of one list file line (with its face box for the
  original photos: box_path, else None)."""
  where, image, label, error, check, box_path = job
  if error:  # the line names no usable image
    return row(where, error=error)
  try:
    code = rafdb_code(label)
    info = index_lib.image_info(image, check)
    box = None if box_path is None else read_box(Path(box_path))
    if box is not None:
      _inside(box, info, Path(box_path))
  except ValueError as e:
    return row(image, error=f'{where}: {e}')
  return row(image, code, box=box, image=info)


def read_list(list_path: Path, image_dir: Path, box_dir: Path | None,
              check: bool) -> dict[str, list]:
  """Each split's parse_rafdb_row jobs, one per non-blank line. box_dir:
  the original photos' box files; None: the aligned faces."""
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
    image = image_dir / (f'{stem}.jpg' if box_dir else f'{stem}_aligned.jpg')
    box = box_dir / f'{stem}_boundingbox.txt' if box_dir else None
    jobs[split or 'train'].append(
        (where, str(image), fields[-1], error, check, box and str(box)))
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
  box_dir = root / BOX_DIR if data.rafdb_images == 'original' else None
  if box_dir and not box_dir.is_dir():
    raise FileNotFoundError(f'{box_dir}: not found ({_BOXES})')
  settings = {'layout': 'rafdb', 'version': index_lib.INDEX_VERSION,
              'check_images': data.check_images,
              'rafdb_images': data.rafdb_images,
              'boxes': box_dir and 'boundingbox x1 y1 x2 y2'}
  listed = [image_dir] + ([box_dir] if box_dir else [])
  key = index_lib.listing_key(settings, [str(list_path)] + [
      entry for folder in listed
      for entry in sorted(os.scandir(folder), key=lambda e: e.name)])

  def build(split: str) -> list[dict]:
    jobs = read_list(list_path, image_dir, box_dir,
                     data.check_images)[split]
    return index_lib.parallel_map(parse_rafdb_row, jobs, data.index_processes)

  name = index_lib.cache_name(root)
  return {split: index_lib.cached_index(
      f'{name}_rafdb_{split}', key, data.index_cache_dir,
      functools.partial(build, split), False) for split in SPLITS}
