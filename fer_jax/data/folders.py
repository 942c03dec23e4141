"""Class folders (Layout C): SET/<class name>/*.jpg, as FER2013, RAF-DB and
many Kaggle copies ship. Labels only: valence and arousal are masked.

A folder's name is matched, case-insensitively, against the expression
names and their usual variants (CLASS_ALIASES), or against
data.class_folders ('1:surprise,2:fear,...', for sets numbered like
RAF-DB's). Images in an unknown folder, or outside any folder, are errors:
never a guessed label. The set's own label space (data.classes '') is the
classes that have a folder holding an image, in canonical order.
"""

import os
from pathlib import Path

import ml_collections

from fer_jax.data import index as index_lib
from fer_jax.data.index import IMAGE_SUFFIXES, row
from fer_jax.labels import CLASS_ALIASES, EXPRESSIONS


def class_map(spec: str) -> dict[str, int]:
  """Folder name -> class: the aliases, or data.class_folders' pairs."""
  if not spec.strip():
    return dict(CLASS_ALIASES)
  mapping = {}
  for pair in spec.split(','):
    folder, sep, name = (s.strip() for s in pair.partition(':'))
    if not sep or name.lower() not in CLASS_ALIASES:
      raise ValueError(f'data.class_folders: {pair.strip()!r} is not '
                       f"'folder:class' with a class among "
                       f'{sorted(CLASS_ALIASES)}')
    mapping[folder.lower()] = CLASS_ALIASES[name.lower()]
  return mapping


def _holds_an_image(folder: str) -> bool:
  """Whether folder or one below it holds an image file (stops at the
  first: a class folder of AffectNet's size is not listed whole)."""
  for entry in os.scandir(folder):
    if entry.is_dir() and _holds_an_image(entry.path):
      return True
    if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES):
      return True
  return False


def own_classes(set_dirs: list[Path], class_folders: str
                ) -> tuple[str, ...]:
  """The label space of class-folder sets: the classes with a folder
  holding an image in any of them, in canonical order (EXPRESSIONS).

  An empty folder is no class: a head unit that no image trains would
  only lower macro F1. Unknown folders are left to index_folders, which
  names their images.
  """
  classes = class_map(class_folders)
  codes = set()
  for set_dir in set_dirs:
    if set_dir.is_dir():
      codes.update(classes[entry.name.lower()]
                   for entry in os.scandir(set_dir)
                   if entry.is_dir() and entry.name.lower() in classes
                   and _holds_an_image(entry.path))
  if len(codes) < 2:
    found = ', '.join(EXPRESSIONS[c] for c in sorted(codes)) or 'none'
    raise ValueError(
        f'{", ".join(map(str, set_dirs))}: class folders with images: '
        f'{found}; a label space needs 2 (class folders need '
        'SET/<class name>/*.jpg)')
  return tuple(EXPRESSIONS[c] for c in sorted(codes))


def parse_folder_row(job: tuple) -> dict:
  """The index row of one image in a class folder."""
  image, code, error, check = job
  if error:  # no label: the image need not be read
    return row(image, error=error)
  try:
    info = index_lib.image_info(image, check)
  except ValueError as e:
    return row(image, error=str(e))
  return row(image, code, image=info)


def _images_below(folder: str) -> list[os.DirEntry]:
  """Every image file below folder, recursively, sorted by path."""
  found = []
  for entry in os.scandir(folder):
    if entry.is_dir():
      found += _images_below(entry.path)
    elif entry.name.lower().endswith(IMAGE_SUFFIXES):
      found.append(entry)
  return sorted(found, key=lambda e: e.path)


def index_folders(set_dir: Path, data: ml_collections.ConfigDict) -> dict:
  """The index of one class-folder set (e.g. ROOT/train)."""
  if not set_dir.is_dir():
    raise FileNotFoundError(f'{set_dir}: folder not found (class folders '
                            'need SET/<class name>/*.jpg)')
  classes = class_map(data.class_folders)
  files = _images_below(str(set_dir))
  jobs = []
  for entry in files:
    relative = Path(entry.path).relative_to(set_dir)
    folder = relative.parts[0] if len(relative.parts) > 1 else None
    code = classes.get(folder.lower()) if folder else None
    error = ''
    if folder is None:
      error = f'{entry.path}: image outside a class folder'
    elif code is None:
      error = (f'{entry.path}: class folder {folder!r} is not one of '
               f'{", ".join(EXPRESSIONS)} (or their variants; set '
               "data.class_folders='folder:class,...')")
    jobs.append((entry.path, -1 if code is None else code, error,
                 data.check_images))
  settings = {'layout': 'folders', 'version': index_lib.INDEX_VERSION,
              'check_images': data.check_images, 'classes': classes}
  key = index_lib.listing_key(settings, files)
  return index_lib.cached_index(
      index_lib.cache_name(set_dir), key, data.index_cache_dir,
      lambda: index_lib.parallel_map(parse_folder_row, jobs,
                                     data.index_processes), False)
