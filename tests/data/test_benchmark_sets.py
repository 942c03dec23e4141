"""RAF-DB, FER2013 and FERPlus (its CSVs and its generated folders) in their
official formats: labels, splits, pixels, the FERPlus vote rules and bad
input."""

import collections
import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fer_jax import labels
from fer_jax.data import fer2013, index, pipeline, rafdb
from tests.data.test_affectnet import data_config, jpeg, truncated_jpeg

BOM = '\ufeff'


def read(indexes: dict, split: str, on_error: str = 'skip',
         classes=labels.EXPRESSIONS):
  return index.to_records(indexes[split], on_error, classes)


def class_counts(records) -> dict:
  return dict(collections.Counter(
      labels.EXPRESSIONS[int(l)] for l in records.labels))


def reasons(report) -> dict:
  return {s['path']: s['reason'] for s in report.skipped}


# RAF-DB ---------------------------------------------------------------------

def write_rafdb(root: Path, text: str, images: dict[str, bytes],
                folder: str = 'aligned') -> Path:
  """The list file (text as given) and images {name: bytes}."""
  (root / 'EmoLabel').mkdir(parents=True, exist_ok=True)
  list_path = root / 'EmoLabel' / 'list_patition_label.txt'
  list_path.write_bytes(text.encode())
  (root / 'Image' / folder).mkdir(parents=True, exist_ok=True)
  for name, content in images.items():
    (root / 'Image' / folder / name).write_bytes(content)
  return list_path


def aligned(*stems: str) -> dict[str, bytes]:
  return {f'{s}_aligned.jpg': jpeg() for s in stems}


RAFDB_LIST = (BOM + 'train_00001.jpg 1\r\ntrain_00002.jpg 4  \r\n\r\n'
              'train_00003.jpg 7\r\ntest_0001.jpg 5\r\ntest_0002.jpg 2\r\n'
              'test_0003.jpg 3 \r\ntest_0004.jpg 6\r\ntrain_00004.jpg 4\r\n'
              '   \r\n')
RAFDB_STEMS = ('train_00001', 'train_00002', 'train_00003', 'train_00004',
               'test_0001', 'test_0002', 'test_0003', 'test_0004')


def test_rafdb_labels_and_splits_from_the_list_file(tmp_path):
  write_rafdb(tmp_path, RAFDB_LIST, aligned(*RAFDB_STEMS))
  indexes = rafdb.index_rafdb(tmp_path, data_config(tmp_path))
  assert set(indexes) == {'train', 'test'}
  train, report = read(indexes, 'train', 'raise')
  assert class_counts(train) == {'Surprise': 1, 'Happy': 2, 'Neutral': 1}
  assert report.skipped == [] and report.dropped_classes == {}
  assert [Path(p).name for p in train.paths] == [
      'train_00001_aligned.jpg', 'train_00002_aligned.jpg',
      'train_00003_aligned.jpg', 'train_00004_aligned.jpg']
  test, _ = read(indexes, 'test', 'raise')
  assert class_counts(test) == {'Sad': 1, 'Fear': 1, 'Disgust': 1,
                                'Anger': 1}
  # RAF-DB's own order (labels.PRESETS): its 1..7 are positions 0..6.
  test, _ = read(indexes, 'test', 'raise', labels.PRESETS['rafdb'])
  assert test.labels.tolist() == [4, 1, 2, 5]
  assert train.pixels is None and train.soft is None


def photo(box: tuple[int, int, int, int], size=(200, 160)) -> bytes:
  """A blue photo whose face box (x1, y1, x2, y2) is red."""
  pixels = np.zeros((size[1], size[0], 3), np.uint8)
  pixels[...] = (20, 40, 220)
  x1, y1, x2, y2 = box
  pixels[y1:y2, x1:x2] = (230, 30, 20)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, 'JPEG', quality=95)
  return buffer.getvalue()


def write_boxes(root: Path, boxes: dict[str, str]) -> Path:
  """RAF-DB's box files, Annotation/boundingbox/<stem>_boundingbox.txt,
  holding text as given (the release: 'x1 y1 x2 y2 ')."""
  folder = root / 'Annotation' / 'boundingbox'
  folder.mkdir(parents=True, exist_ok=True)
  for stem, text in boxes.items():
    (folder / f'{stem}_boundingbox.txt').write_text(text)
  return folder


FACE_BOX = (60, 40, 120, 100)  # x1 y1 x2 y2: 60 x 60 px


def original_rafdb(root: Path) -> Path:
  """RAFDB_LIST's photos, each with its face box file."""
  write_rafdb(root, RAFDB_LIST, {f'{s}.jpg': photo(FACE_BOX)
                                 for s in RAFDB_STEMS}, folder='original')
  return write_boxes(root, {s: '60.0 40.0 120.0 100.0 \n'
                            for s in RAFDB_STEMS})


def test_rafdb_original_photos_are_cropped_by_their_boxes(tmp_path):
  original_rafdb(tmp_path)
  data = data_config(tmp_path, rafdb_images='original', image_size=40,
                     face_margin=0.0)
  indexes = rafdb.index_rafdb(tmp_path, data)
  train, _ = read(indexes, 'train', 'raise')
  assert train.paths[0] == str(
      tmp_path / 'Image' / 'original' / 'train_00001.jpg')
  np.testing.assert_array_equal(train.boxes, [[60, 40, 60, 60]] * 4)
  # The face alone, then the margin: a square of 60 x (1 + 2 x 0.5) px
  # around the box's centre, the face its middle half (a quarter of it).
  face = pipeline.load_image(train[0], data).astype(int)
  assert (np.abs(face - (230, 30, 20)).max(-1) < 40).mean() > 0.95
  data.face_margin = 0.5
  wider = pipeline.load_image(train[0], data).astype(int)
  red = np.abs(wider - (230, 30, 20)).max(-1) < 60
  assert red[15:25, 15:25].all() and not red[:8, :8].any()
  assert red.mean() == pytest.approx(0.25, abs=0.03)
  with pytest.raises(ValueError, match="data.rafdb_images: 'both'"):
    rafdb.index_rafdb(tmp_path, data_config(tmp_path, rafdb_images='both'))


def test_rafdb_original_without_box_files_is_refused_in_one_line(tmp_path):
  write_rafdb(tmp_path, RAFDB_LIST, {f'{s}.jpg': photo(FACE_BOX)
                                     for s in RAFDB_STEMS}, folder='original')
  with pytest.raises(FileNotFoundError) as refused:
    rafdb.index_rafdb(tmp_path, data_config(tmp_path,
                                            rafdb_images='original'))
  assert str(refused.value) == (
      f'{tmp_path / "Annotation" / "boundingbox"}: not found '
      "(data.rafdb_images='original' crops each photo by its face box, "
      'ROOT/Annotation/boundingbox/<name>_boundingbox.txt as RAF-DB ships '
      "them; without them use 'aligned')")
  # The aligned faces need none.
  write_rafdb(tmp_path, RAFDB_LIST, aligned(*RAFDB_STEMS))
  read(rafdb.index_rafdb(tmp_path, data_config(tmp_path)), 'train', 'raise')


def test_rafdb_bad_box_files_are_row_errors_naming_them(tmp_path):
  folder = original_rafdb(tmp_path)
  at = lambda stem: folder / f'{stem}_boundingbox.txt'
  write_boxes(tmp_path, {
      'train_00001': '',                          # empty
      'train_00002': '60.0 40.0 120.0',           # truncated
      'train_00003': '60 40 120 100 7',           # a fifth field
      'train_00004': '60 40 x 100',               # not a number
      'test_0001': '120 40 60 100',               # x2 < x1
      'test_0002': '60 40 60 100',                # no width
      'test_0003': '300 200 400 260'})            # outside the photo
  at_line = lambda line: f'{tmp_path / rafdb.LIST_FILE}:{line}'
  indexes = rafdb.index_rafdb(tmp_path, data_config(
      tmp_path, rafdb_images='original'))
  train, report = read(indexes, 'train')
  images = tmp_path / 'Image' / 'original'
  assert len(train) == 0
  assert reasons(report) == {
      str(images / 'train_00001.jpg'):
          f'{at_line(1)}: {at("train_00001")}: expected "x1 y1 x2 y2", '
          'found 0 fields',
      str(images / 'train_00002.jpg'):
          f'{at_line(2)}: {at("train_00002")}: expected "x1 y1 x2 y2", '
          'found 3 fields',
      str(images / 'train_00003.jpg'):
          f'{at_line(4)}: {at("train_00003")}: expected "x1 y1 x2 y2", '
          'found 5 fields',
      str(images / 'train_00004.jpg'):
          f"{at_line(9)}: {at('train_00004')}: 'x' is not a number"}
  test, report = read(indexes, 'test')
  assert [Path(p).name for p in test.paths] == ['test_0004.jpg']
  assert reasons(report) == {
      str(images / 'test_0001.jpg'):
          f'{at_line(5)}: {at("test_0001")}: face box [120.0, 40.0, 60.0, '
          '100.0] (x1 y1 x2 y2) has no area',
      str(images / 'test_0002.jpg'):
          f'{at_line(6)}: {at("test_0002")}: face box [60.0, 40.0, 60.0, '
          '100.0] (x1 y1 x2 y2) has no area',
      str(images / 'test_0003.jpg'):
          f'{at_line(7)}: {at("test_0003")}: face box [300.0, 200.0, 400.0, '
          '260.0] (x1 y1 x2 y2) lies outside the 200x160 image'}
  (folder / 'test_0004_boundingbox.txt').unlink()
  test, report = read(rafdb.index_rafdb(tmp_path, data_config(
      tmp_path, rafdb_images='original')), 'test')
  assert reasons(report)[str(images / 'test_0004.jpg')] == (
      f'{at_line(8)}: {at("test_0004")}: face box file missing')


def test_rafdb_bad_lines_are_row_errors_naming_list_file_and_line(tmp_path):
  list_path = write_rafdb(tmp_path, (
      'train_00001.jpg 4\n'         # 1 kept
      'train_00002.jpg 9\n'         # 2 label out of range
      'train_00003.jpg x\n'         # 3 not a number
      'train_00004.jpg\n'           # 4 one field
      'train_00005.jpg 4 extra\n'   # 5 three fields
      'val_00006.jpg 4\n'           # 6 no split prefix
      'train_00001.jpg 5\n'         # 7 listed again
      'test_0001.jpg 4\n'           # 8 image missing
      'test_0002.jpg 1\n'           # 9 unreadable image
      'test_0003.jpg 0\n'),         # 10 label out of range
      aligned('train_00001', 'train_00002', 'train_00003', 'train_00004',
              'train_00005', 'val_00006', 'test_0003')
      | {'test_0002_aligned.jpg': truncated_jpeg()})
  indexes = rafdb.index_rafdb(tmp_path, data_config(tmp_path))
  with pytest.raises(ValueError, match=(
      rf"list_patition_label\.txt:2: label '9' not in 1\.\.7")):
    read(indexes, 'train', 'raise')
  train, report = read(indexes, 'train')
  images = tmp_path / 'Image' / 'aligned'
  at = lambda line: f'{list_path}:{line}'
  assert class_counts(train) == {'Happy': 1}
  assert reasons(report) == {
      str(images / 'train_00002_aligned.jpg'):
          f"{at(2)}: label '9' not in 1..7",
      str(images / 'train_00003_aligned.jpg'):
          f"{at(3)}: label: 'x' is not a number",
      at(4): f'{at(4)}: expected "<image name> <label>", found 1 fields',
      at(5): f'{at(5)}: expected "<image name> <label>", found 3 fields',
      at(6): f"{at(6)}: 'val_00006.jpg' starts with neither train_ nor "
             'test_',
      at(7): f"{at(7)}: 'train_00001.jpg' listed again (line 1)"}
  test, report = read(indexes, 'test')
  assert len(test) == 0
  test_reasons = reasons(report)
  assert test_reasons[str(images / 'test_0001_aligned.jpg')] == (
      f'{at(8)}: {images / "test_0001_aligned.jpg"}: image file missing')
  assert test_reasons[str(images / 'test_0002_aligned.jpg')].startswith(
      f'{at(9)}: {images / "test_0002_aligned.jpg"}: not a readable image')
  assert test_reasons[str(images / 'test_0003_aligned.jpg')] == (
      f"{at(10)}: label '0' not in 1..7")


def test_rafdb_missing_files_are_named_and_changes_reindex(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match=r'list_patition_label\.txt: not found \(RAF-DB'):
    rafdb.index_rafdb(tmp_path, data_config(tmp_path))
  list_path = write_rafdb(tmp_path, 'train_00001.jpg 1\n', {})
  data = data_config(tmp_path)
  train, report = read(rafdb.index_rafdb(tmp_path, data), 'train')
  assert len(train) == 0 and len(report.skipped) == 1
  write_rafdb(tmp_path, 'train_00001.jpg 1\n', aligned('train_00001'))
  train, _ = read(rafdb.index_rafdb(tmp_path, data), 'train', 'raise')
  assert class_counts(train) == {'Surprise': 1}  # a new image: new index
  list_path.write_text('train_00001.jpg 7 \n')
  train, _ = read(rafdb.index_rafdb(tmp_path, data), 'train', 'raise')
  assert class_counts(train) == {'Neutral': 1}   # a new list: new index
  for child in (tmp_path / 'Image' / 'aligned').iterdir():
    child.unlink()
  (tmp_path / 'Image' / 'aligned').rmdir()
  with pytest.raises(FileNotFoundError, match=r'Image/aligned: not found'):
    rafdb.index_rafdb(tmp_path, data)


# FER2013 --------------------------------------------------------------------

def faces(n: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, 48, 48),
                                              dtype=np.uint8)


def pixel_text(face: np.ndarray) -> str:
  return ' '.join(str(v) for v in face.reshape(-1))


def short(face: np.ndarray) -> str:
  """The face's pixels without the last: 2,303 values."""
  return pixel_text(face).rsplit(' ', 1)[0]


def csv_text(header: list[str], rows: list[list[str]]) -> str:
  """The rows as csv.writer writes them (CRLF ends, quotes where needed)."""
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(header)
  writer.writerows(rows)
  return buffer.getvalue()


def test_fer2013_labels_splits_and_pixels(tmp_path):
  face = faces(12)
  bad_value = pixel_text(face[6]).rsplit(' ', 1)[0] + ' 256'
  rows = [['0', pixel_text(face[0]), 'Training'],       # 2 Anger
          ['3', pixel_text(face[1]), 'Training'],       # 3 Happy
          ['6', pixel_text(face[2]), 'PublicTest'],     # 4 Neutral
          ['5', pixel_text(face[3]), 'PrivateTest'],    # 5 Surprise
          ['7', pixel_text(face[4]), 'Training'],       # 6 bad emotion
          ['2', short(face[5]), 'Training'],            # 7 2,303 values
          ['4', bad_value, 'PublicTest'],               # 8 256
          ['1', 'x' + pixel_text(face[7]), 'PrivateTest'],  # 9 'x0'
          ['1', pixel_text(face[8]), 'Other'],          # 10 unknown Usage
          [],                                           # 11 blank
          ['4', pixel_text(face[9]), 'Training '],      # 12 Sad
          ['1', pixel_text(face[10]), 'PublicTest'],    # 13 Disgust
          ['2', pixel_text(face[11]), 'PrivateTest']]   # 14 Fear
  text = csv_text(['emotion', 'pixels', 'Usage'], rows)
  path = tmp_path / 'fer2013.csv'
  path.write_bytes((BOM + text).encode())
  indexes = fer2013.index_fer2013(tmp_path, data_config(tmp_path))
  at = lambda line: f'{path}:{line}'
  expected = {'train': ({'Anger': 1, 'Happy': 1, 'Sad': 1},
                        {2: 0, 3: 1, 12: 9}),
              'val': ({'Neutral': 1, 'Disgust': 1}, {4: 2, 13: 10}),
              'test': ({'Surprise': 1, 'Fear': 1}, {5: 3, 14: 11})}
  for split, (counts, faces_at) in expected.items():
    records, _ = read(indexes, split)
    assert class_counts(records) == counts, split
    assert records.paths.tolist() == [at(line) for line in faces_at]
    np.testing.assert_array_equal(records.pixels,
                                  face[list(faces_at.values())])
  _, train_report = read(indexes, 'train')
  assert reasons(train_report) == {
      at(6): f"{at(6)}: emotion: '7' not in 0..6",
      at(7): f'{at(7)}: pixels: expected 2304 grey values, found 2303',
      at(10): f"{at(10)}: Usage 'Other' is not one of Training, PublicTest, "
              'PrivateTest'}
  assert reasons(read(indexes, 'val')[1]) == {
      at(8): f"{at(8)}: pixels: '256' is not a grey value 0..255"}
  assert reasons(read(indexes, 'test')[1]) == {
      at(9): f"{at(9)}: pixels: 'x{face[7, 0, 0]}' is not a grey value "
             '0..255'}
  with pytest.raises(ValueError, match=rf'fer2013\.csv:6: emotion'):
    read(indexes, 'train', 'raise')


def test_fer2013_quoted_fields_and_cache_give_the_same_index(tmp_path):
  face = faces(2, seed=1)
  path = tmp_path / 'fer2013.csv'
  path.write_text('"emotion","pixels","Usage"\n' + ''.join(
      f'"{c}","{pixel_text(f)}","Training"\n' for c, f in zip('36', face)))
  data = data_config(tmp_path)
  first = fer2013.index_fer2013(tmp_path, data)['train']
  again = fer2013.index_fer2013(tmp_path, data)['train']  # from the cache
  for built in (first, again):
    records, _ = index.to_records(built, 'raise')
    assert class_counts(records) == {'Happy': 1, 'Neutral': 1}
    np.testing.assert_array_equal(records.pixels, face)
  assert len(list((tmp_path / 'index_cache').glob('*.npz'))) == 3


def test_fer2013_missing_file_or_columns_raise_naming_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'fer2013\.csv: file not found'):
    fer2013.index_fer2013(tmp_path, data_config(tmp_path))
  (tmp_path / 'fer2013.csv').write_text('emotion,Usage\n0,Training\n')
  with pytest.raises(ValueError, match=(
      r"fer2013\.csv: missing columns \['pixels'\]")):
    fer2013.index_fer2013(tmp_path, data_config(tmp_path))


# FERPlus --------------------------------------------------------------------

# (Usage, Image name, votes in fer2013new.csv's column order (neutral,
# happiness, surprise, sadness, anger, disgust, fear, contempt, unknown,
# NF), the label by majority, by probability and crossentropy). Each
# worked by hand.
VOTE_ROWS = [
    # Probability: 6 of the 8 votes left are 75%: neutral alone is kept.
    ('Training', 'a.png', '6,2,1,1,0,0,0,0,0,0', 'Neutral', 'Neutral'),
    # 4 of the 7 votes left: more than half.
    ('Training', 'b.png', '4,3,1,1,1,0,0,0,0,0', 'Neutral', 'Neutral'),
    # 3 of 8: no majority; probability keeps the tied top (surprise,
    # sadness), 6 of 8, labelled by the first in FERPlus's column order.
    ('Training', 'c.png', '0,0,3,3,2,1,1,0,0,0', 'No-Majority', 'Surprise'),
    ('Training', 'd.png', '2,0,0,0,0,0,0,0,7,1', 'Unknown', 'Unknown'),
    ('Training', 'e.png', '0,0,0,0,0,0,0,0,0,10', 'No-Face', 'No-Face'),
    ('Training', '', '0,0,0,0,0,0,0,0,0,10', 'No-Face', 'No-Face'),
    # An expression tied with unknown: probability keeps the expression
    # alone, 4 of 10 votes, not more than half.
    ('Training', 'g.png', '4,0,0,0,0,0,0,0,4,2', 'No-Majority',
     'No-Majority'),
    ('Training', 'h.png', '0,0,0,0,0,0,0,0,0,0', 'error', 'error'),
    ('Training', 'i.png', '5,0,0,0,-1,0,0,0,0,0', 'error', 'error'),
    # Probability: 6 of 10, then unknown and NF tied: the taking stops.
    ('Training', 'j.png', '0,0,0,0,0,0,0,6,2,2', 'Contempt', 'Contempt'),
    # Every vote a single: none left.
    ('Training', 'k.png', '1,1,1,1,1,1,1,1,1,1', 'No-Majority',
     'No-Majority'),
    ('Training', 'l.png', '0,x,0,0,9,0,0,0,0,0', 'error', 'error'),
    ('PublicTest', 'm.png', '0,8,0,0,0,0,0,0,2,0', 'Happy', 'Happy'),
    # Validation and test are labelled by majority in both modes.
    ('PublicTest', 'n.png', '3,3,2,1,1,0,0,0,0,0', 'No-Majority',
     'No-Majority'),
    ('PublicTest', 'o.png', '0,0,0,0,2,0,8,0,0,0', 'Fear', 'Fear'),
    ('PrivateTest', 'p.png', '3,3,2,1,1,0,0,0,0,0', 'No-Majority',
     'No-Majority'),
    ('PrivateTest', 'q.png', '0,0,0,0,7,2,1,0,0,0', 'Anger', 'Anger'),
    ('PrivateTest', 'r.png', '0,0,0,10,0,0,0,0,0,0', 'error', 'error'),
]
SPLIT_OF = {'Training': 'train', 'PublicTest': 'val', 'PrivateTest': 'test'}
# The votes probability and crossentropy keep (canonical order).
EXPECTED_VOTES = {'a.png': [6, 0, 0, 0, 0, 0, 0, 0],
                  'b.png': [4, 3, 0, 0, 0, 0, 0, 0],
                  'c.png': [0, 0, 3, 3, 0, 0, 0, 0],
                  'j.png': [0, 0, 0, 0, 0, 0, 0, 6]}
DISTRIBUTION_MODES = ('probability', 'crossentropy')


@pytest.fixture
def ferplus_root(tmp_path) -> Path:
  face = faces(len(VOTE_ROWS), seed=2)
  fer_rows = [['0', pixel_text(f), usage]
              for f, (usage, *_) in zip(face, VOTE_ROWS)]
  fer_rows[-1][1] = short(face[-1])  # r.png
  (tmp_path / 'fer2013.csv').write_text(
      csv_text(['emotion', 'pixels', 'Usage'], fer_rows))
  (tmp_path / 'fer2013new.csv').write_bytes((BOM + csv_text(
      list(fer2013.FERPLUS_COLUMNS),
      [[usage, name, *votes.split(',')]
       for usage, name, votes, *_ in VOTE_ROWS])).encode())
  np.save(tmp_path / 'faces.npy', face)
  return tmp_path


@pytest.mark.parametrize('mode', ['majority', *DISTRIBUTION_MODES])
def test_ferplus_vote_rules(ferplus_root, mode):
  indexes = fer2013.index_ferplus(ferplus_root, data_config(
      ferplus_root, ferplus_labels=mode))
  face = np.load(ferplus_root / 'faces.npy')
  new_csv = ferplus_root / 'fer2013new.csv'
  column = 3 if mode == 'majority' else 4
  for split in ('train', 'val', 'test'):
    rows = [(line, r) for line, r in enumerate(VOTE_ROWS, 2)
            if SPLIT_OF[r[0]] == split]
    kept = [(line, r) for line, r in rows
            if r[column] in labels.EXPRESSIONS]
    dropped = collections.Counter(
        r[column] for _, r in rows
        if r[column] != 'error' and r[column] not in labels.EXPRESSIONS)
    records, report = read(indexes, split)
    assert records.paths.tolist() == [f'{new_csv}:{l}' for l, _ in kept]
    assert [labels.EXPRESSIONS[i] for i in records.labels] == [
        r[column] for _, r in kept]
    assert report.dropped_classes == dict(dropped)
    assert list(reasons(report)) == [
        f'{new_csv}:{l}' for l, r in rows if r[column] == 'error']
    np.testing.assert_array_equal(records.pixels,
                                  face[[l - 2 for l, _ in kept]])
    if mode == 'majority' or split != 'train':
      assert records.soft is None and 'votes' not in indexes[split]
    else:
      expected = np.array([EXPECTED_VOTES[r[1]] for _, r in kept], float)
      np.testing.assert_allclose(
          records.soft, expected / expected.sum(1, keepdims=True))


def test_ferplus_row_errors_name_their_file_and_line(ferplus_root):
  indexes = fer2013.index_ferplus(ferplus_root, data_config(ferplus_root))
  new_csv, fer_csv = (ferplus_root / 'fer2013new.csv',
                      ferplus_root / 'fer2013.csv')
  assert reasons(read(indexes, 'train')[1]) == {
      f'{new_csv}:9': f'{new_csv}:9: no votes',
      f'{new_csv}:10': f"{new_csv}:10: anger: '-1' is not a vote count",
      f'{new_csv}:13': f"{new_csv}:13: happiness: 'x' is not a number"}
  assert reasons(read(indexes, 'test')[1]) == {
      f'{new_csv}:19': f'{fer_csv}:19: pixels: expected 2304 grey values, '
                       'found 2303'}
  with pytest.raises(ValueError, match=rf'fer2013new\.csv:9: no votes'):
    read(indexes, 'train', 'raise')
  with pytest.raises(ValueError, match="data.ferplus_labels: 'soft'"):
    fer2013.index_ferplus(ferplus_root, data_config(
        ferplus_root, ferplus_labels='soft'))


def test_ferplus_files_that_do_not_line_up_raise(ferplus_root):
  new_csv = ferplus_root / 'fer2013new.csv'
  lines = new_csv.read_text(encoding='utf-8-sig').splitlines()
  new_csv.write_text('\n'.join(lines[:-1]) + '\n')
  with pytest.raises(ValueError, match=(
      rf'fer2013new\.csv: {len(VOTE_ROWS) - 1} rows, but .*fer2013\.csv has '
      rf'{len(VOTE_ROWS)}')):
    fer2013.index_ferplus(ferplus_root, data_config(ferplus_root))
  lines[2] = lines[2].replace('Training', 'PublicTest')
  new_csv.write_text('\n'.join(lines) + '\n')
  with pytest.raises(ValueError, match=(
      r"fer2013new\.csv:3: Usage 'PublicTest', but .*fer2013\.csv:3 has "
      "'Training'")):
    fer2013.index_ferplus(ferplus_root, data_config(ferplus_root))
  (ferplus_root / 'fer2013.csv').unlink()
  with pytest.raises(FileNotFoundError, match=r'fer2013\.csv: file not'):
    fer2013.index_ferplus(ferplus_root, data_config(ferplus_root))


# FERPlus's folders ----------------------------------------------------------

FOLDER_OF = {'Training': 'FER2013Train', 'PublicTest': 'FER2013Valid',
             'PrivateTest': 'FER2013Test'}
BOX = '(0, 0, 48, 48)'
# VOTE_ROWS in the folders differ only where the images do: b.png's is
# missing, r.png's is whole (its pixels were short in fer2013.csv).
FOLDER_LABELS = {'b.png': ('error', 'error'), 'r.png': ('Sad', 'Sad')}
# (usage, name, the fields after the name, majority, probability): rows
# only the folders have.
FOLDER_EXTRA = [
    ('PublicTest', 's.png', [BOX, '1', '2', '3'], 'error', 'error'),
    # No face box, as older copies of FERPlus's script wrote label.csv.
    ('Training', 'u.png', '0,9,0,0,0,0,0,0,1,0'.split(','), 'Happy', 'Happy'),
    ('PrivateTest', 't.png', [BOX, *'0,0,0,0,7,2,1,0,0,0'.split(',')],
     'error', 'error'),  # an unreadable image
    ('Training', ' ', [BOX, *'0,9,0,0,0,0,0,0,1,0'.split(',')], 'error',
     'error')]


def png(face: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(face).save(buffer, 'PNG')
  return buffer.getvalue()


def folder_rows() -> list[tuple]:
  """FOLDER_EXTRA after VOTE_ROWS as label.csv holds them (FERPlus's script
  writes no line and no image for a row without a name)."""
  return [(usage, name, [BOX, *votes.split(',')],
           *FOLDER_LABELS.get(name, labelled))
          for usage, name, votes, *labelled in VOTE_ROWS if name
          ] + FOLDER_EXTRA


def write_folders(root: Path, rows: list[tuple], images: dict[str, bytes]
                  ) -> dict[str, tuple[Path, int]]:
  """Each folder's label.csv (csv.writer's, as FERPlus's script writes it)
  and images; {name: (label.csv, line)}."""
  lines = {}
  for usage, folder in FOLDER_OF.items():
    (root / folder).mkdir(parents=True, exist_ok=True)
    mine = [r for r in rows if r[0] == usage]
    buffer = io.StringIO()
    csv.writer(buffer).writerows([n, *fields] for _, n, fields, *_ in mine)
    (root / folder / 'label.csv').write_text(buffer.getvalue())
    for line, (_, name, *_) in enumerate(mine, 1):
      lines[name] = (root / folder / 'label.csv', line)
      if name in images:
        (root / folder / name).write_bytes(images[name])
  return lines


@pytest.fixture
def ferplus_folders(tmp_path) -> tuple[Path, dict]:
  """VOTE_ROWS's faces and votes as FERPlus's folders, in tmp_path/ferplus."""
  root = tmp_path / 'ferplus'
  face = faces(len(VOTE_ROWS), seed=2)  # ferplus_root's
  images = {name: png(f) for f, (_, name, *_) in zip(face, VOTE_ROWS)
            if name and name != 'b.png'}
  images['t.png'] = png(face[0])[:60]
  images['u.png'] = png(face[0])
  return root, write_folders(root, folder_rows(), images)


def test_ferplus_folder_rows_keep_their_label_csv_format(ferplus_folders):
  root, _ = ferplus_folders
  lines = (root / 'FER2013Train' / 'label.csv').read_text().splitlines()
  assert lines[0] == 'a.png,"(0, 0, 48, 48)",6,2,1,1,0,0,0,0,0,0'


@pytest.mark.parametrize('mode', ['majority', *DISTRIBUTION_MODES])
def test_ferplus_folders_vote_rules(ferplus_folders, mode):
  root, lines = ferplus_folders
  indexes = fer2013.index_ferplus(root, data_config(root,
                                                    ferplus_labels=mode))
  column = 3 if mode == 'majority' else 4
  for split, folder in zip(('train', 'val', 'test'), FOLDER_OF.values()):
    rows = [r for r in folder_rows() if lines[r[1]][0].parent.name == folder]
    kept = [r for r in rows if r[column] in labels.EXPRESSIONS]
    records, report = read(indexes, split)
    assert records.paths.tolist() == [str(root / folder / r[1]) for r in kept]
    assert [labels.EXPRESSIONS[i] for i in records.labels] == [
        r[column] for r in kept]
    assert report.dropped_classes == dict(collections.Counter(
        r[column] for r in rows if r[column] != 'error'
        and r[column] not in labels.EXPRESSIONS))
    assert len(report.skipped) == sum(r[column] == 'error' for r in rows)
    assert records.pixels is None
    assert report.image_notes['most_common_sizes'] == (
        {'48x48': len(kept)} if kept else {})
    if mode == 'majority' or split != 'train':
      assert records.soft is None and 'votes' not in indexes[split]
    else:
      votes = EXPECTED_VOTES | {'u.png': [0, 9, 0, 0, 0, 0, 0, 0]}
      expected = np.array([votes[r[1]] for r in kept], float)
      np.testing.assert_allclose(
          records.soft, expected / expected.sum(1, keepdims=True))


@pytest.mark.parametrize('mode', ['majority', *DISTRIBUTION_MODES])
def test_ferplus_folders_label_as_the_csvs_they_come_from(
    ferplus_root, ferplus_folders, mode):
  folders_root, _ = ferplus_folders
  from_csv = fer2013.index_ferplus(ferplus_root, data_config(
      ferplus_root, ferplus_labels=mode))
  from_folders = fer2013.index_ferplus(folders_root, data_config(
      folders_root, ferplus_labels=mode))
  same = {r[1] for r in VOTE_ROWS if r[1]} - set(FOLDER_LABELS)
  for split in ('train', 'val', 'test'):
    csv_records, _ = read(from_csv, split)
    records, _ = read(from_folders, split)
    csv_names = [VOTE_ROWS[int(p.rsplit(':', 1)[1]) - 2][1]
                 for p in csv_records.paths]
    names = [Path(p).name for p in records.paths]
    keep = [i for i, n in enumerate(names) if n in same]
    assert keep, split
    assert [names[i] for i in keep] == [n for n in csv_names if n in same]
    csv_keep = [csv_names.index(names[i]) for i in keep]
    np.testing.assert_array_equal(records.labels[keep],
                                  csv_records.labels[csv_keep])
    if records.soft is not None:
      np.testing.assert_array_equal(records.soft[keep],
                                    csv_records.soft[csv_keep])
    for i, j in zip(keep, csv_keep):  # the same faces
      np.testing.assert_array_equal(np.asarray(Image.open(records.paths[i])),
                                    csv_records.pixels[j])


def test_ferplus_folder_row_errors_name_label_csv_and_line(ferplus_folders):
  root, lines = ferplus_folders
  data = data_config(root)
  indexes = fer2013.index_ferplus(root, data)
  at = lambda name: '{}:{}'.format(*lines[name])
  image = lambda name: str(lines[name][0].parent / name)
  assert at('h.png').endswith('label.csv:7')  # f.png has no line
  assert reasons(read(indexes, 'train')[1]) == {
      image('b.png'): f'{at("b.png")}: {image("b.png")}: image file missing',
      image('h.png'): f'{at("h.png")}: no votes',
      image('i.png'): f"{at('i.png')}: anger: '-1' is not a vote count",
      image('l.png'): f"{at('l.png')}: happiness: 'x' is not a number",
      at(' '): f'{at(" ")}: no image name'}
  assert reasons(read(indexes, 'val')[1]) == {
      at('s.png'): f'{at("s.png")}: expected an image name, its face box '
                   'and 10 vote counts, found 5 fields'}
  test_reasons = reasons(read(indexes, 'test')[1])
  assert list(test_reasons) == [image('t.png')]
  assert test_reasons[image('t.png')].startswith(
      f'{at("t.png")}: {image("t.png")}: not a readable image')
  with pytest.raises(ValueError, match=(
      r'FER2013Train/label\.csv:2: .*FER2013Train/b\.png: image file')):
    read(indexes, 'train', 'raise')
  # A new image is a new listing: b.png indexed again, now kept.
  Path(image('b.png')).write_bytes(png(faces(1)[0]))
  train, _ = read(fer2013.index_ferplus(root, data), 'train')
  assert image('b.png') in train.paths.tolist()


def test_ferplus_without_either_layout_names_both(ferplus_folders):
  root, _ = ferplus_folders
  (root / 'FER2013Test' / 'label.csv').unlink()
  with pytest.raises(FileNotFoundError, match=(
      r'FER2013Test/label\.csv: file not found \(FERPlus needs '
      r'ROOT/fer2013new\.csv beside ROOT/fer2013\.csv, or the folders '
      r'FERPlus generates: ROOT/FER2013Train/, FER2013Valid/, FER2013Test/')):
    fer2013.index_ferplus(root, data_config(root))
  (root / 'FER2013Train' / 'label.csv').unlink()
  with pytest.raises(FileNotFoundError, match=(
      r'fer2013new\.csv: file not found \(FERPlus needs .* or the folders')):
    fer2013.index_ferplus(root, data_config(root))


# Odd files ------------------------------------------------------------------

def mutate(content: bytes, rng: np.random.Generator) -> bytes:
  """content with one or two random damages a hand-edited file shows."""
  for _ in range(rng.integers(1, 3)):
    kind = rng.integers(10)
    cut = int(rng.integers(len(content) + 1))
    if kind == 0:
      content = content[:cut]                          # truncated
    elif kind == 1:
      content = b''                                    # empty
    elif kind == 2:
      content = BOM.encode() + content.replace(b'\n', b'\r\n')
    elif kind == 3:
      content = content.replace(b'\n', b'\r')          # old Mac ends
    elif kind == 4:
      content = content[:cut] + b'"' + content[cut:]   # stray quote
    elif kind == 5:
      junk = [b'x', b'-1', b'300', b'1.5', b'', b'nan', b',', b'\x00',
              b'\xff', b' ', b'\n']
      content = content[:cut] + junk[rng.integers(len(junk))] + content[
          cut + int(rng.integers(4)):]
    elif kind == 6:
      content = content.replace(b'Usage', b'usage', 1)  # a column renamed
    elif kind == 7:
      content = content[:cut] + content[cut + int(rng.integers(200)):]
    elif kind == 8:
      content = content.replace(b',', b'","')           # quoted fields
    else:
      lines = content.split(b'\n')
      content = b'\n'.join(lines[:1] + lines[1:][::-1])  # rows reordered
  return content


def check_outcome(build, files: list[Path]) -> str:
  """'ok' when every row is labelled or names its file and line; the error's
  kind when it raised ValueError or FileNotFoundError naming a file."""
  try:
    indexes = build()
  except (ValueError, FileNotFoundError) as e:
    message = str(e)
    assert '\n' not in message and any(str(f) in message for f in files), (
        message)
    return type(e).__name__
  for split, built in indexes.items():
    for code, error in zip(built['code'], built['error']):
      assert error or 0 <= code <= max(labels.EXTRA_CODES), (split, code)
      assert not error or any(f'{f}:' in error for f in files), error
    records, _ = index.to_records(built, 'skip')
    if 'pixels' in built:
      assert records.pixels.shape[1:] == (48, 48)
  return 'ok'


def fuzz(tmp_path: Path, write, build, files: list[str], cases: int = 30
         ) -> collections.Counter:
  """How `cases` damaged copies of write(root)'s files read: the outcomes
  of check_outcome. build(root) indexes one."""
  rng = np.random.default_rng(0)
  outcomes = collections.Counter()
  for case in range(cases):
    root = tmp_path / f'case{case}'
    write(root)
    for name in files[:1 + int(rng.integers(len(files)))]:
      if rng.random() < 0.8 or case == 0:
        path = root / name
        path.write_bytes(mutate(path.read_bytes(), rng))
    outcomes[check_outcome(lambda: build(root),
                           [root / name for name in files])] += 1
  return outcomes


def test_odd_rafdb_list_files_never_raise_anything_else(tmp_path):
  def write(root):
    write_rafdb(root, RAFDB_LIST.lstrip(BOM).replace('\r\n', '\n'),
                aligned(*RAFDB_STEMS))
  outcomes = fuzz(tmp_path, write,
                  lambda root: rafdb.index_rafdb(root, data_config(root)),
                  ['EmoLabel/list_patition_label.txt'])
  assert outcomes['ok'] > 20, outcomes


def test_odd_fer2013_files_never_raise_anything_else(tmp_path):
  face = faces(3)
  def write(root):
    root.mkdir(parents=True)
    (root / 'fer2013.csv').write_text('emotion,pixels,Usage\n' + ''.join(
        f'{c},{pixel_text(f)},{u}\n' for c, f, u in zip(
            '036', face, ('Training', 'PublicTest', 'PrivateTest'))))
  outcomes = fuzz(tmp_path, write, lambda root: fer2013.index_fer2013(
      root, data_config(root)), ['fer2013.csv'])
  assert outcomes['ok'] > 10 and outcomes['ValueError'] > 3, outcomes


def test_odd_ferplus_files_never_raise_anything_else(tmp_path):
  face = faces(3)
  usages = ('Training', 'PublicTest', 'PrivateTest')
  def write(root):
    root.mkdir(parents=True)
    (root / 'fer2013.csv').write_text('emotion,pixels,Usage\n' + ''.join(
        f'0,{pixel_text(f)},{u}\n' for f, u in zip(face, usages)))
    votes = ('6,2,1,1,0,0,0,0,0,0', '0,0,0,0,0,0,0,0,0,10',
             '0,0,0,0,7,2,1,0,0,0')
    (root / 'fer2013new.csv').write_text(
        ','.join(fer2013.FERPLUS_COLUMNS) + '\n' + ''.join(
            f'{u},{n},{v}\n' for u, n, v in zip(
                usages, ('a.png', '', 'c.png'), votes)))
  for mode in fer2013.FERPLUS_LABELS:
    outcomes = fuzz(tmp_path / mode, write, lambda root: (
        fer2013.index_ferplus(root, data_config(root, ferplus_labels=mode))),
        ['fer2013new.csv', 'fer2013.csv'])
    assert outcomes['ok'] > 5 and outcomes['ValueError'] > 3, outcomes


def test_odd_ferplus_label_csvs_never_raise_anything_else(tmp_path):
  rows = [('Training', 'a.png', [BOX, *'6,2,1,1,0,0,0,0,0,0'.split(',')]),
          ('PublicTest', 'b.png', [BOX, *'0,0,0,0,0,0,0,0,0,10'.split(',')]),
          ('PrivateTest', 'c.png', [BOX, *'0,0,0,0,7,2,1,0,0,0'.split(',')])]
  images = {name: png(f) for (_, name, _), f in zip(rows, faces(3))}
  files = [f'{folder}/label.csv' for folder in FOLDER_OF.values()]
  for mode in fer2013.FERPLUS_LABELS:
    outcomes = fuzz(tmp_path / mode, lambda root: write_folders(
        root, rows, images), lambda root: fer2013.index_ferplus(
            root, data_config(root, ferplus_labels=mode)), files)
    assert outcomes['ok'] > 20, outcomes


# Through the pipeline --------------------------------------------------------

def test_fer2013_pixels_become_grey_rgb_batches_of_the_configured_size(
    tmp_path):
  from fer_jax.configs import default
  from fer_jax import data
  from fer_jax.data import images, pipeline
  face = faces(9, seed=5)
  usages = ['Training'] * 5 + ['PublicTest'] * 2 + ['PrivateTest'] * 2
  (tmp_path / 'fer2013.csv').write_text(csv_text(
      ['emotion', 'pixels', 'Usage'],
      [[str(i % 7), pixel_text(f), u] for i, (f, u) in enumerate(
          zip(face, usages))]))
  config = default.get_config()
  config.data.update(layout='fer2013', root=str(tmp_path), image_size=32,
                     index_cache_dir=str(tmp_path / 'index'),
                     index_processes=1)
  config.train.eval_batch_size = 4
  splits, report = data.load_splits(config)
  assert report['classes'] == list(labels.PRESETS['fer2013'])
  assert [len(splits[s]) for s in ('train', 'val', 'test')] == [5, 2, 2]
  # FER2013's own codes are its positions in its preset.
  assert splits['train'].labels.tolist() == [0, 1, 2, 3, 4]
  batch = next(pipeline.eval_batches(splits['test'], config, 1))
  image = batch['image'][0, 0]
  assert image.shape == (32, 32, 3)
  assert (image == image[:, :, :1]).all()  # grey in every channel
  np.testing.assert_array_equal(image[:, :, 0],
                                images.resize(face[7], 32))


def test_ferplus_crossentropy_batches_carry_the_kept_vote_distributions(
    ferplus_root):
  from fer_jax.configs import default
  from fer_jax import data
  from fer_jax.data import pipeline
  config = default.get_config()
  config.data.update(layout='ferplus', root=str(ferplus_root),
                     ferplus_labels='crossentropy', image_size=16,
                     index_cache_dir=str(ferplus_root / 'index'),
                     index_processes=1, on_error='skip')
  config.train.update(batch_size=2, num_epochs=1)
  splits, _ = data.load_splits(config)
  assert splits['val'].soft is None and splits['test'].soft is None
  batch = next(pipeline.train_batches(splits['train'], config, 1))
  soft, label = batch['soft'][0], batch['label'][0]
  assert soft.shape == (2, 8)
  np.testing.assert_allclose(soft.sum(1), 1, rtol=1e-6)
  # The label is a top vote (ties, as c.png's, go to FERPlus's first column).
  np.testing.assert_array_equal(soft[np.arange(2), label], soft.max(1))
