"""Layouts A (per-image .npy) and B (CSV): values, label rules, bad input."""

import csv
import io
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from fer_jax.data import affectnet, index
from fer_jax.configs import default

LANDMARKS = np.arange(136, dtype=np.float64).reshape(68, 2) + 0.5


def data_config(tmp_path: Path, **overrides) -> ml_collections.ConfigDict:
  data = default.get_config().data
  data.index_cache_dir = str(tmp_path / 'index_cache')
  data.index_processes = 1
  data.update(overrides)
  return data


def jpeg(size=(8, 8), colour=(90, 120, 150)) -> bytes:
  buffer = io.BytesIO()
  Image.new('RGB', size, colour).save(buffer, 'JPEG', quality=95)
  return buffer.getvalue()


def write_sample(split: Path, sample_id: str, exp, val, aro, lnd=None,
                 image: bytes | None = b'jpeg') -> None:
  (split / 'images').mkdir(parents=True, exist_ok=True)
  (split / 'annotations').mkdir(parents=True, exist_ok=True)
  if image is not None:
    (split / 'images' / f'{sample_id}.jpg').write_bytes(
        jpeg() if image == b'jpeg' else image)
  for kind, value in (('exp', exp), ('val', val), ('aro', aro), ('lnd', lnd)):
    if value is not None:
      np.save(split / 'annotations' / f'{sample_id}_{kind}.npy', value)


def read_npy(split: Path, on_error: str = 'raise', **overrides):
  data = data_config(split.parent, **overrides)
  return index.to_records(affectnet.index_npy(split, data), on_error)


def by_id(records) -> dict:
  return {Path(p).stem: (int(l), tuple(np.round(v, 4)), bool(m))
          for p, l, v, m in zip(records.paths, records.labels, records.va,
                                records.va_mask)}


# Layout A ------------------------------------------------------------------

def test_string_0d_and_one_element_values_all_parse(tmp_path):
  split = tmp_path / 'train_set'
  write_sample(split, '10', np.array('3'), np.array('-0.176'),
               np.array('0.5'), lnd=LANDMARKS.reshape(-1))
  write_sample(split, '22', np.array(4.0), np.array(0.25, np.float32),
               np.array([-0.5]), lnd=np.array(';'.join(
                   str(v) for v in LANDMARKS.reshape(-1))))
  write_sample(split, '7', np.array([b'6']), np.array(['1']),
               np.array([[0.0]]))
  records, report = read_npy(split)
  assert by_id(records) == {'10': (3, (-0.176, 0.5), True),
                            '22': (4, (0.25, -0.5), True),
                            '7': (6, (1.0, 0.0), True)}
  assert report.skipped == [] and report.dropped_classes == {}
  landmarks = dict(zip((Path(p).stem for p in records.paths),
                       records.landmarks))
  np.testing.assert_array_equal(landmarks['10'], LANDMARKS)
  np.testing.assert_array_equal(landmarks['22'], LANDMARKS)
  assert np.isnan(landmarks['7']).all()  # no _lnd.npy: kept, marked absent
  assert np.isnan(records.boxes).all()   # Layout A: the whole image


def test_codes_8_to_10_dropped_and_counted_and_missing_va_masked(tmp_path):
  split = tmp_path / 'train_set'
  for i, code in enumerate([0, 8, 9, 9, 10, 1]):
    write_sample(split, str(100 + i), np.array(str(code)),
                 np.array('-2' if code == 1 else '0.1'), np.array('0.2'))
  write_sample(split, '200', np.array('2'), np.array('0.3'),
               np.array('1.5'))  # out of range: masked, label kept
  records, report = read_npy(split)
  assert report.dropped_classes == {'None': 1, 'Uncertain': 2, 'No-Face': 1}
  assert by_id(records) == {'100': (0, (0.1, 0.2), True),
                            '105': (1, (0.0, 0.0), False),
                            '200': (2, (0.0, 0.0), False)}


@pytest.mark.parametrize('exp,message', [
    (np.array('12'), r"_exp\.npy: expression 12 not in 0\.\.10"),
    (np.array('abc'), r"_exp\.npy: 'abc' is not a number"),
    (np.array('2.5'), r"_exp\.npy: expression 2\.5 not in"),
    (np.array([1, 2]), r"_exp\.npy: expected one value, found shape \(2,\)"),
    (np.array('nan'), r"_exp\.npy: expression nan not in"),
    (np.array('inf'), r"_exp\.npy: expression inf not in"),
])
def test_bad_expression_raises_naming_the_file(tmp_path, exp, message):
  write_sample(tmp_path / 'train_set', '5', exp, np.array('0'), np.array('0'))
  with pytest.raises(ValueError, match=message):
    read_npy(tmp_path / 'train_set')


def truncated_jpeg() -> bytes:
  data = jpeg((64, 64), (200, 30, 30))
  return data[:len(data) // 2]


def png_bytes(mode='RGB', size=(8, 8)) -> bytes:
  buffer = io.BytesIO()
  Image.new(mode, size, 77 if mode == 'L' else (10, 200, 30)).save(
      buffer, 'PNG')
  return buffer.getvalue()


def test_every_bad_file_raises_by_name_or_is_skipped_and_listed(tmp_path):
  split = tmp_path / 'train_set'
  good = (np.array('1'), np.array('0.1'), np.array('0.2'))
  write_sample(split, '1', *good)
  write_sample(split, '2', *good, image=truncated_jpeg())
  write_sample(split, '3', *good, image=b'\xff\xd8 not a jpeg at all')
  write_sample(split, '4', np.array('x'), np.array('0'), np.array('0'))
  write_sample(split, '5', np.array('2'), None, np.array('0'))
  write_sample(split, '6', np.array('2'), np.array('0'), np.array('0'),
               image=None)  # annotation without its image
  write_sample(split, '7', *good)
  (split / 'annotations' / '7_aro.npy').write_bytes(b'')
  write_sample(split, '8', *good, lnd=np.arange(10.0))
  write_sample(split, '9', np.array('12'), np.array('0'), np.array('0'))
  with pytest.raises(ValueError, match=r'2\.jpg: not a readable image'):
    read_npy(split)
  records, report = read_npy(split, on_error='skip')
  assert by_id(records) == {'1': (1, (0.1, 0.2), True)}
  reasons = {Path(s['path']).name: s['reason'] for s in report.skipped}
  assert set(reasons) == {'2.jpg', '3.jpg', '4.jpg', '5.jpg', '6_exp.npy',
                          '7.jpg', '8.jpg', '9.jpg'}
  assert 'truncated' in reasons['2.jpg'].lower()
  assert 'not a readable image' in reasons['3.jpg']
  assert reasons['4.jpg'].endswith("4_exp.npy: 'x' is not a number")
  assert reasons['5.jpg'].endswith('5_val.npy: annotation file missing')
  assert 'annotation without an image' in reasons['6_exp.npy']
  assert '7_aro.npy: cannot read annotation' in reasons['7.jpg']
  assert '8_lnd.npy: expected 136 finite landmark' in reasons['8.jpg']
  assert 'expression 12 not in 0..10' in reasons['9.jpg']


def test_odd_but_readable_images_are_kept_with_their_labels(tmp_path):
  """Greyscale, another size, a PNG named .jpg: decoded by content."""
  split = tmp_path / 'train_set'
  write_sample(split, '1', np.array('1'), np.array('0'), np.array('0'),
               image=png_bytes('L'))
  write_sample(split, '2', np.array('2'), np.array('0'), np.array('0'),
               image=png_bytes('RGB', (20, 12)))
  write_sample(split, '3', np.array('3'), np.array('0'), np.array('0'))
  records, report = read_npy(split)
  assert sorted(by_id(records).items()) == [
      ('1', (1, (0.0, 0.0), True)), ('2', (2, (0.0, 0.0), True)),
      ('3', (3, (0.0, 0.0), True))]
  assert report.image_notes == {
      'greyscale': 1, 'suffix_mismatch': 2,
      'most_common_sizes': {'8x8': 2, '20x12': 1}}


def test_missing_folder_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='images: folder not found'):
    read_npy(tmp_path / 'train_set')


def test_unchecked_images_only_need_to_exist(tmp_path):
  split = tmp_path / 'train_set'
  write_sample(split, '1', np.array('1'), np.array('0'), np.array('0'),
               image=truncated_jpeg())
  records, _ = read_npy(split, check_images=False)
  assert len(records) == 1  # decoding it is left to training


# Layout B ------------------------------------------------------------------

def write_csv(path: Path, rows: list[dict], columns=affectnet.CSV_COLUMNS
              ) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for row in rows:
      writer.writerow([row.get(c, '') for c in columns])


def csv_row(image: str, expression='1', valence='0.5', arousal='-0.25',
            box=(10, 20, 30, 40), landmarks=';'.join(
                f'{v:g}' for v in LANDMARKS.reshape(-1))) -> dict:
  return dict(zip(affectnet.CSV_COLUMNS, (
      image, *(str(v) for v in box), landmarks, expression, valence,
      arousal)))


def read_csv(root: Path, on_error='raise', name='training.csv'):
  data = data_config(root)
  built = affectnet.index_csv(root / name, data, root / data.images_dir)
  return index.to_records(built, on_error)


@pytest.fixture
def csv_root(tmp_path) -> Path:
  images = tmp_path / 'Manually_Annotated_Images'
  (images / '12').mkdir(parents=True)
  for name in ('a.jpg', 'b.jpg', 'c.jpg', 'd.jpg'):
    (images / '12' / name).write_bytes(jpeg((100, 80)))
  (images / '12' / 'bad.jpg').write_bytes(truncated_jpeg())
  return tmp_path


def test_csv_rows_give_boxes_landmarks_and_label_rules(csv_root):
  write_csv(csv_root / 'training.csv', [
      csv_row('12/a.jpg'),
      csv_row('12/b.jpg', expression='9'),
      csv_row('12/c.jpg', expression='7', valence='-2', arousal='-2',
              landmarks=''),
      csv_row('12/d.jpg', expression='0', arousal='1.0001'),
  ])
  records, report = read_csv(csv_root)
  assert [Path(p).name for p in records.paths] == ['a.jpg', 'c.jpg',
                                                   'd.jpg']
  np.testing.assert_array_equal(records.labels, [1, 7, 0])
  np.testing.assert_allclose(records.va, [[0.5, -0.25], [0, 0], [0, 0]])
  np.testing.assert_array_equal(records.va_mask, [True, False, False])
  np.testing.assert_array_equal(records.boxes, [[10, 20, 30, 40]] * 3)
  np.testing.assert_array_equal(records.landmarks[0], LANDMARKS)
  assert np.isnan(records.landmarks[1]).all()
  assert report.dropped_classes == {'Uncertain': 1}


def test_csv_bad_rows_name_file_line_and_column(csv_root):
  write_csv(csv_root / 'training.csv', [
      csv_row('12/a.jpg'),
      csv_row('12/missing.jpg'),
      csv_row('12/b.jpg', valence='high'),
      csv_row('12/c.jpg', expression='12'),
      csv_row('12/d.jpg', box=(10, 20, 0, 40)),
      csv_row('12/a.jpg', box=(500, 20, 30, 40)),
      csv_row('12/bad.jpg'),
      csv_row('12/b.jpg', landmarks='1;2;3'),
  ])
  csv_path = csv_root / 'training.csv'
  with pytest.raises(ValueError, match=r'missing\.jpg: image file missing'):
    read_csv(csv_root)
  records, report = read_csv(csv_root, on_error='skip')
  assert [Path(p).name for p in records.paths] == ['a.jpg']
  reasons = [s['reason'] for s in report.skipped]
  assert reasons[0].endswith('missing.jpg: image file missing')
  assert reasons[1] == f"{csv_path}:4: valence: 'high' is not a number"
  assert reasons[2] == f'{csv_path}:5: expression: expression 12 not in 0..10'
  assert reasons[3].startswith(f'{csv_path}:6: face box [10.0, 20.0, 0.0')
  assert 'lies outside the 100x80 image' in reasons[4]
  assert 'bad.jpg: not a readable image' in reasons[5]
  assert reasons[6].startswith(f'{csv_path}:9: facial_landmarks: expected 136')


def test_csv_without_a_required_column_is_named(csv_root):
  columns = [c for c in affectnet.CSV_COLUMNS if c != 'arousal']
  write_csv(csv_root / 'training.csv', [csv_row('12/a.jpg')], columns)
  with pytest.raises(ValueError, match=r"training\.csv: missing columns "
                     r"\['arousal'\]"):
    read_csv(csv_root)


# The index cache -----------------------------------------------------------

def test_index_is_cached_and_rebuilt_when_a_file_changes(tmp_path,
                                                         monkeypatch):
  split = tmp_path / 'train_set'
  write_sample(split, '1', np.array('1'), np.array('0'), np.array('0'))
  write_sample(split, '2', np.array('2'), np.array('0'), np.array('0'))
  first, _ = read_npy(split)
  assert len(list((tmp_path / 'index_cache').glob('*.npz'))) == 1

  def no_parsing(job):
    raise AssertionError('parsed again')
  monkeypatch.setattr(affectnet, 'parse_npy_row', no_parsing)
  again, _ = read_npy(split)  # from the cache: nothing parsed
  np.testing.assert_array_equal(again.paths, first.paths)
  monkeypatch.undo()
  np.save(split / 'annotations' / '2_exp.npy', np.array('5'))
  changed, _ = read_npy(split)
  assert by_id(changed)['2'][0] == 5
  assert len(list((tmp_path / 'index_cache').glob('*.npz'))) == 2


def test_parallel_index_equals_serial(tmp_path, monkeypatch):
  split = tmp_path / 'train_set'
  for i in range(6):
    write_sample(split, str(3 * i + 1), np.array(str(i % 8)),
                 np.array(str(i / 10)), np.array('-2' if i == 4 else '0.3'),
                 image=truncated_jpeg() if i == 2 else b'jpeg')
  serial = affectnet.index_npy(split, data_config(tmp_path / 's'))
  monkeypatch.setattr(index, '_MIN_PARALLEL_JOBS', 0)
  parallel = affectnet.index_npy(split, data_config(tmp_path / 'p',
                                                    index_processes=2))
  assert serial.keys() == parallel.keys()
  for key in serial:
    np.testing.assert_array_equal(serial[key], parallel[key], err_msg=key)


def test_dropped_codes_are_counted_whatever_else_is_wrong(tmp_path,
                                                          csv_root):
  """A No-Face row needs no box, image or valence to be dropped."""
  split = tmp_path / 'train_set'
  write_sample(split, '1', np.array('10'), None, None)
  write_sample(split, '2', np.array('1'), np.array('0'), np.array('0'))
  records, report = read_npy(split)
  assert len(records) == 1 and report.dropped_classes == {'No-Face': 1}
  write_csv(csv_root / 'training.csv', [
      csv_row('12/a.jpg'),
      csv_row('12/missing.jpg', expression='10', box=(0, 0, 0, 0),
              landmarks='', valence='', arousal='')])
  records, report = read_csv(csv_root)
  assert len(records) == 1 and report.dropped_classes == {'No-Face': 1}


def test_formats_training_cannot_decode_are_refused_when_indexing(tmp_path):
  split = tmp_path / 'train_set'
  buffer = io.BytesIO()
  Image.new('RGB', (8, 8)).save(buffer, 'GIF')
  write_sample(split, '1', np.array('1'), np.array('0'), np.array('0'),
               image=buffer.getvalue())
  with pytest.raises(ValueError, match=r'1\.jpg: GIF images are not '
                     r'supported \(only JPEG'):
    read_npy(split)


def test_csv_with_byte_order_mark_and_multiline_field(csv_root):
  """Excel's UTF-8 BOM; line numbers count the lines a quoted field spans."""
  path = csv_root / 'training.csv'
  write_csv(path, [csv_row('12/a.jpg'), csv_row('12/b.jpg', valence='x')])
  text = path.read_text().replace('12/a.jpg', '"12/a.jpg"').replace(
      ',0.5,', ',"0.5\n",', 1)
  path.write_text('\ufeff' + text)
  records, report = read_csv(csv_root, on_error='skip')
  assert [Path(p).name for p in records.paths] == ['a.jpg']
  assert report.skipped[0]['reason'].startswith(f'{path}:4: valence')
