"""Seeded fuzzing of the readers of outside input that the benchmark sets'
tests do not cover: AffectNet's CSV and .npy annotations, class folders,
RAF-DB's face box files, and predict's images and videos. Each damaged input gives its result or is
named with a reason; nothing raises anything else."""

import collections
import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from fer_jax import predict, video
from fer_jax.data import affectnet, folders, rafdb
from tests.conftest import tiny_config
from tests.data.test_affectnet import (csv_row, data_config, jpeg,
                                       write_csv, write_sample)
from tests.data.test_benchmark_sets import check_outcome, fuzz, mutate


def test_odd_affectnet_csvs_never_raise_anything_else(tmp_path):
  def write(root):
    (root / 'images').mkdir(parents=True)
    for i in range(4):
      (root / 'images' / f'{i}.jpg').write_bytes(jpeg((80, 80)))
    write_csv(root / 'training.csv',
              [csv_row(f'{i}.jpg', expression=str(i)) for i in range(4)])
  build = lambda root: {'train': affectnet.index_csv(
      root / 'training.csv', data_config(root, images_dir='images'),
      root / 'images')}
  outcomes = fuzz(tmp_path, write, build, ['training.csv'], cases=30)
  assert sum(outcomes.values()) == 30 and outcomes['ok'] >= 10, outcomes


def odd_npy(rng: np.random.Generator) -> bytes:
  """An annotation file of the wrong kind: dtype, shape, or damaged."""
  buffer = io.BytesIO()
  kind = rng.integers(6)
  value = [np.array(['x']), np.zeros((2, 3)), np.array(7.5),
           np.array([], np.float32), np.array([b'3']), np.array(['1'])][kind]
  np.save(buffer, value)
  return mutate(buffer.getvalue(), rng) if rng.random() < 0.4 else (
      buffer.getvalue())


def test_odd_affectnet_npy_annotations_never_raise_anything_else(tmp_path):
  rng = np.random.default_rng(1)
  outcomes = collections.Counter()
  for case in range(30):
    split = tmp_path / f'case{case}' / 'train_set'
    for i in range(3):
      write_sample(split, str(i), np.array(str(i)), np.array('0.1'),
                   np.array('-0.2'))
    damaged = split / 'annotations' / f'{rng.integers(3)}_{rng.choice(["exp", "val", "aro", "lnd"])}.npy'
    damaged.write_bytes(odd_npy(rng))
    outcomes[check_outcome(lambda: {'train': affectnet.index_npy(
        split, data_config(split.parent))}, [damaged])] += 1
  assert sum(outcomes.values()) == 30, outcomes


def test_odd_class_folders_never_raise_anything_else(tmp_path):
  rng = np.random.default_rng(2)
  names = ['happy', 'Sad', 'surprised', 'bored', 'ÄRGER', 'with space', '']
  outcomes = collections.Counter()
  for case in range(20):
    root = tmp_path / f'case{case}' / 'train'
    files = []
    for i in range(3):
      folder = root / names[rng.integers(len(names))]
      folder.mkdir(parents=True, exist_ok=True)
      files.append(folder / f'{i}.jpg')
      files[-1].write_bytes(mutate(jpeg(), rng) if rng.random() < 0.4
                            else jpeg())
    outcomes[check_outcome(lambda: {'train': folders.index_folders(
        root, data_config(root.parent))}, files)] += 1
  assert sum(outcomes.values()) == 20, outcomes


# RAF-DB's face box files: one kind of damage each, and whether it must be
# refused (None: a damage that may leave a usable box).
_GOOD_BOX = '60.0 40.0 120.0 100.0 '


BOX_DAMAGES = ('good', 'empty', 'truncated', 'fields', 'not a number',
               'degenerate', 'negative', 'outside', 'mutated')


def odd_box(kind: str, rng: np.random.Generator) -> tuple[bytes, bool | None]:
  """A box file with one kind of damage, and whether its row must be an
  error (None: either)."""
  numbers = [float(v) for v in _GOOD_BOX.split()]
  if kind == 'good':
    text, bad = _GOOD_BOX + rng.choice(['', '\n', '\r\n']), False
  elif kind == 'empty':
    text, bad = rng.choice(['', ' ', '\n', '\ufeff']), True
  elif kind == 'truncated':
    text, bad = _GOOD_BOX[:rng.integers(1, len(_GOOD_BOX) - 1)], None
  elif kind == 'fields':
    count = int(rng.choice([1, 2, 3, 5, 8]))
    text, bad = ' '.join(['50'] * count), True
  elif kind == 'not a number':
    numbers = [str(v) for v in numbers]
    numbers[rng.integers(4)] = str(rng.choice(
        ['x', 'nan', 'inf', '1,5', '0x10', '--3', '\xff', 'None']))
    text, bad = ' '.join(numbers), True
  elif kind == 'degenerate':  # no width or height, or corners swapped
    x1, y1, x2, y2 = numbers
    text, bad = ' '.join(map(str, rng.choice([
        [x1, y1, x1, y2], [x1, y1, x2, y1], [x2, y1, x1, y2],
        [x1, y2, x2, y1], [x2, y2, x1, y1]]))), True
  elif kind == 'negative':  # left of and above the photo
    text, bad = '-90 -80 -30 -20', True
  elif kind == 'outside':
    text, bad = str(rng.choice(['200 40 260 100', '60 160 120 220',
                                '1e9 1e9 2e9 2e9'])), True
  else:
    text, bad = mutate(_GOOD_BOX.encode(), rng).decode('latin-1'), None
  return text.encode('latin-1' if kind == 'mutated' else 'utf-8'), bad


def test_odd_rafdb_box_files_never_raise_anything_else(tmp_path):
  """RAF-DB's original photos with damaged face box files: every row
  keeps a box of area inside its photo or names the box file; each kind
  of damage tried 7 times, and counted."""
  from tests.data.test_benchmark_sets import photo, write_boxes, write_rafdb
  rng = np.random.default_rng(4)
  refused, outcomes = collections.Counter(), collections.Counter()
  for case in range(7 * len(BOX_DAMAGES)):
    root = tmp_path / f'case{case}'
    write_rafdb(root, 'train_00001.jpg 4\ntest_0001.jpg 2\n',
                {f'{s}.jpg': photo((60, 40, 120, 100))
                 for s in ('train_00001', 'test_0001')}, folder='original')
    kind = BOX_DAMAGES[case % len(BOX_DAMAGES)]
    content, bad = odd_box(kind, rng)
    box = write_boxes(root, {'test_0001': _GOOD_BOX}) / (
        'train_00001_boundingbox.txt')
    box.write_bytes(content)
    build = lambda: rafdb.index_rafdb(root, data_config(
        root, rafdb_images='original'))
    outcomes[check_outcome(build, [root / rafdb.LIST_FILE, box])] += 1
    train = build()['train']
    error = str(train['error'][0])
    if bad is not None:
      assert bool(error) == bad, (kind, content, error)
    if error:
      assert error.startswith(f'{root / rafdb.LIST_FILE}:1: {box}: '), error
      refused[kind] += 1
    else:
      x, y, w, h = train['box'][0]
      assert w > 0 and h > 0 and x < 200 and y < 160 and x + w > 0 and (
          y + h > 0), (kind, content)
  assert outcomes == {'ok': 7 * len(BOX_DAMAGES)}, outcomes
  assert {k: refused[k] for k in BOX_DAMAGES} == {
      'good': 0, 'empty': 7, 'truncated': refused['truncated'], 'fields': 7,
      'not a number': 7, 'degenerate': 7, 'negative': 7, 'outside': 7,
      'mutated': refused['mutated']}
  assert refused['truncated'] >= 3 and refused['mutated'] >= 1, refused


def photo_cases(folder: Path) -> list[Path]:
  """Photos of every kind a user's folder holds, good and bad."""
  rng = np.random.default_rng(3)
  rgb = rng.integers(0, 256, (40, 30, 3), np.uint8)
  cases = {}
  for mode in ('RGB', 'L', 'RGBA', 'P', 'CMYK', 'I;16', '1', 'LA'):
    image = Image.fromarray(rgb).convert(mode if mode != 'I;16' else 'I')
    fmt = 'JPEG' if mode in ('RGB', 'L', 'CMYK') else 'PNG'
    buffer = io.BytesIO()
    (image.convert('I;16') if mode == 'I;16' else image).save(buffer, fmt)
    cases[f'{mode.replace(";", "")}.{fmt.lower()}'] = buffer.getvalue()
  good = cases['RGB.jpeg']
  cases.update({
      'empty.jpg': b'', 'cut.jpg': good[:len(good) // 3],
      'png_named.jpg': cases['RGBA.png'], 'one.png': _png((1, 1)),
      'junk.png': bytes(rng.integers(0, 256, 500, np.uint8)),
      'bad_exif.jpg': _with_exif(b'Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff'),
      'huge_header.jpg': _huge_header(good),
      'anim.gif': _gif(), 'text.webp': b'not an image'})
  for name, data in cases.items():
    (folder / name).write_bytes(data)
  return sorted(folder / name for name in cases)


def _png(size) -> bytes:
  buffer = io.BytesIO()
  Image.new('RGB', size, (1, 2, 3)).save(buffer, 'PNG')
  return buffer.getvalue()


def _with_exif(exif: bytes) -> bytes:
  buffer = io.BytesIO()
  Image.new('RGB', (20, 20), (9, 9, 9)).save(buffer, 'JPEG', exif=exif)
  return buffer.getvalue()


def _huge_header(data: bytes) -> bytes:
  """A JPEG whose header declares 60000 x 60000 pixels."""
  data = bytearray(data)
  at = data.index(b'\xff\xc0') + 5
  data[at:at + 4] = (60000).to_bytes(2, 'big') * 2
  return bytes(data)


def _gif() -> bytes:
  frames = [Image.new('P', (16, 16), i) for i in range(3)]
  buffer = io.BytesIO()
  frames[0].save(buffer, 'GIF', save_all=True, append_images=frames[1:])
  return buffer.getvalue()


def test_every_photo_gives_its_face_or_a_reason(tmp_path):
  config = tiny_config(tmp_path)
  size = config.data.image_size
  paths = photo_cases(tmp_path)
  tally = predict.Tally()
  crops = list(predict._all_crops(paths, config, None, tally))
  named = {c.path for c in crops} | {p for p, _ in tally.skipped}
  assert named == {str(p) for p in paths}
  assert all(c.image.shape == (size, size, 3) and c.image.dtype == np.uint8
             for c in crops)
  skipped = {Path(p).name for p, _ in tally.skipped}
  assert skipped == {'empty.jpg', 'cut.jpg', 'junk.png', 'huge_header.jpg',
                     'anim.gif', 'text.webp'}, tally.skipped
  assert all(reason.startswith(path) for path, reason in tally.skipped)


def test_every_video_gives_its_frames_or_a_reason(tmp_path):
  config = tiny_config(tmp_path)
  good = tmp_path / 'good.mp4'
  out = video.writer(good, 10.0, (32, 24))
  for i in range(3):
    out.write(np.full((24, 32, 3), 60 * i, np.uint8))
  out.release()
  data = good.read_bytes()
  cases = {'empty.mp4': b'', 'text.avi': b'a video? no',
           'cut.mp4': data[:len(data) // 2], 'junk.mkv': bytes(range(256))}
  for name, content in cases.items():
    (tmp_path / name).write_bytes(content)
  paths = [good] + [tmp_path / name for name in cases]
  tally = predict.Tally()
  crops = list(predict._all_crops(paths, config, None, tally))
  assert [c.frame for c in crops if c.path == str(good)] == [0, 1, 2]
  named = {c.path for c in crops} | {p for p, _ in tally.skipped}
  assert named == {str(p) for p in paths}, tally.skipped
