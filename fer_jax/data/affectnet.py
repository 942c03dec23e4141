"""Reading AffectNet's per-image .npy release (Layout A) into label arrays.

Label rules: expressions 0-7 are kept; 8 (None), 9 (Uncertain) and
10 (No-Face) are dropped and counted. A valence or arousal of -2, or any
value outside [-1, 1], means "no value": the sample keeps its class and is
masked out of the valence/arousal loss and metrics.
"""

import dataclasses
import math
from pathlib import Path

import numpy as np
from PIL import Image

from fer_jax.labels import EXTRA_CODES, NUM_CLASSES

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')


@dataclasses.dataclass(frozen=True)
class Records:
  """One split: image paths with their labels, as parallel arrays."""
  paths: np.ndarray     # str [N]
  labels: np.ndarray    # int32 [N], 0..7
  va: np.ndarray        # float32 [N, 2]; 0 where masked
  va_mask: np.ndarray   # bool [N]: valence and arousal both valid

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> dict:
    return {'path': self.paths[i], 'label': self.labels[i], 'va': self.va[i],
            'va_mask': self.va_mask[i]}

  def subset(self, index: np.ndarray) -> 'Records':
    """The records at the given positions."""
    return Records(self.paths[index], self.labels[index], self.va[index],
                   self.va_mask[index])


@dataclasses.dataclass
class SourceReport:
  """What reading one released split kept, dropped and skipped."""
  dropped_classes: dict  # {code name: count}
  skipped: list          # [{path, reason}]


def read_scalar(path: Path) -> float:
  """The single number in an annotation file: a string, 0-d or 1-element."""
  try:
    value = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f'{path}: cannot read annotation: {e!r}') from e
  if value.size != 1:
    raise ValueError(f'{path}: expected one value, found shape {value.shape}')
  item = value.reshape(-1)[0]
  try:
    return float(item)
  except (TypeError, ValueError):
    raise ValueError(f'{path}: {str(item)!r} is not a number') from None


def read_expression(path: Path) -> int:
  """The expression code 0..10 of an _exp.npy file."""
  value = read_scalar(path)
  if not math.isfinite(value) or value != int(value) or not (
      0 <= value <= max(EXTRA_CODES)):
    raise ValueError(f'{path}: expression {value:g} not in '
                     f'0..{max(EXTRA_CODES)}')
  return int(value)


def read_npy_split(split_dir: Path, on_error: str = 'raise'
                   ) -> tuple[Records, SourceReport]:
  """Reads ROOT/{train_set,val_set} of Layout A, applying the label rules."""
  if on_error not in ('raise', 'skip'):
    raise ValueError(f"data.on_error: {on_error!r} is not 'raise' or 'skip'")
  split_dir = Path(split_dir)
  images, annotations = split_dir / 'images', split_dir / 'annotations'
  for folder in (images, annotations):
    if not folder.is_dir():
      raise FileNotFoundError(f'{folder}: folder not found (Layout A needs '
                              'images/ and annotations/)')
  report = SourceReport(dropped_classes={}, skipped=[])
  paths, labels, va, va_mask = [], [], [], []
  image_files = sorted(p for p in images.iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES)
  for image in image_files:
    try:
      label, values = _read_annotations(annotations, image.stem)
      check_image(image)
    except (ValueError, FileNotFoundError) as e:
      if on_error == 'raise':
        raise
      report.skipped.append({'path': str(image), 'reason': str(e)})
      continue
    if label >= NUM_CLASSES:
      name = EXTRA_CODES[label]
      report.dropped_classes[name] = report.dropped_classes.get(name, 0) + 1
      continue
    valid = bool(np.all(np.abs(values) <= 1))
    paths.append(str(image))
    labels.append(label)
    va.append(values if valid else (0.0, 0.0))
    va_mask.append(valid)
  unmatched = ({p.name.split('_')[0] for p in annotations.glob('*_exp.npy')}
               - {p.stem for p in image_files})
  for stem in sorted(unmatched):
    report.skipped.append({'path': str(annotations / f'{stem}_exp.npy'),
                           'reason': 'annotation without an image'})
  records = Records(np.array(paths, dtype=str),
                    np.array(labels, dtype=np.int32),
                    np.array(va, dtype=np.float32).reshape(-1, 2),
                    np.array(va_mask, dtype=bool))
  return records, report


def check_image(path: Path) -> None:
  """Raises if path is not a readable image (its header; decoding is later)."""
  try:
    with Image.open(path) as image:
      image.verify()
  except (OSError, SyntaxError) as e:
    raise ValueError(f'{path}: not a readable image: {e}') from e


def _read_annotations(annotations: Path, stem: str
                      ) -> tuple[int, tuple[float, float]]:
  """Expression code and (valence, arousal) of one image."""
  files = {k: annotations / f'{stem}_{k}.npy' for k in ('exp', 'val', 'aro')}
  for path in files.values():
    if not path.exists():
      raise FileNotFoundError(f'{path}: annotation file missing')
  return (read_expression(files['exp']),
          (read_scalar(files['val']), read_scalar(files['aro'])))
