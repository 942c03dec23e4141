"""Layout A reader: value formats, label rules and bad input."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fer_jax.data import affectnet


def write_sample(split: Path, sample_id: str, exp, val, aro,
                 image: bool = True) -> None:
  (split / 'images').mkdir(parents=True, exist_ok=True)
  (split / 'annotations').mkdir(parents=True, exist_ok=True)
  if image:
    Image.new('RGB', (8, 8)).save(split / 'images' / f'{sample_id}.jpg')
  for kind, value in (('exp', exp), ('val', val), ('aro', aro)):
    if value is not None:
      np.save(split / 'annotations' / f'{sample_id}_{kind}.npy', value)


def test_string_0d_and_one_element_values_all_parse(tmp_path):
  write_sample(tmp_path, '10', np.array('3'), np.array('-0.176'),
               np.array('0.5'))
  write_sample(tmp_path, '22', np.array(4.0), np.array(0.25, np.float32),
               np.array([-0.5]))
  write_sample(tmp_path, '7', np.array([b'6']), np.array(['1']),
               np.array([[0.0]]))
  records, report = affectnet.read_npy_split(tmp_path)
  got = {Path(p).stem: (int(l), tuple(np.round(v, 4)), bool(m))
         for p, l, v, m in zip(records.paths, records.labels, records.va,
                               records.va_mask)}
  assert got == {'10': (3, (-0.176, 0.5), True),
                 '22': (4, (0.25, -0.5), True),
                 '7': (6, (1.0, 0.0), True)}
  assert report.skipped == [] and report.dropped_classes == {}


def test_codes_8_to_10_dropped_and_counted_and_missing_va_masked(tmp_path):
  for i, code in enumerate([0, 8, 9, 9, 10, 1]):
    write_sample(tmp_path, str(100 + i), np.array(str(code)),
                 np.array('-2' if code == 1 else '0.1'), np.array('0.2'))
  write_sample(tmp_path, '200', np.array('2'), np.array('0.3'),
               np.array('1.5'))  # out of range: masked, label kept
  records, report = affectnet.read_npy_split(tmp_path)
  assert report.dropped_classes == {'None': 1, 'Uncertain': 2, 'No-Face': 1}
  assert sorted(records.labels.tolist()) == [0, 1, 2]
  masked = {int(l): bool(m) for l, m in zip(records.labels, records.va_mask)}
  assert masked == {0: True, 1: False, 2: False}
  assert np.all(records.va[~records.va_mask] == 0)


@pytest.mark.parametrize('exp,message', [
    (np.array('12'), r"_exp\.npy: expression 12 not in 0\.\.10"),
    (np.array('abc'), r"_exp\.npy: 'abc' is not a number"),
    (np.array('2.5'), r"_exp\.npy: expression 2\.5 not in"),
    (np.array([1, 2]), r"_exp\.npy: expected one value, found shape \(2,\)"),
    (np.array('nan'), r"_exp\.npy: expression nan not in"),
    (np.array('inf'), r"_exp\.npy: expression inf not in"),
])
def test_bad_expression_raises_naming_the_file(tmp_path, exp, message):
  write_sample(tmp_path, '5', exp, np.array('0'), np.array('0'))
  with pytest.raises(ValueError, match=message):
    affectnet.read_npy_split(tmp_path)


def test_empty_annotation_file_is_named(tmp_path):
  write_sample(tmp_path, '5', np.array('1'), np.array('0'), np.array('0'))
  (tmp_path / 'annotations' / '5_val.npy').write_bytes(b'')
  with pytest.raises(ValueError, match=r'5_val\.npy: cannot read annotation'):
    affectnet.read_npy_split(tmp_path)


def test_broken_image_raises_or_is_skipped(tmp_path):
  write_sample(tmp_path, '1', np.array('1'), np.array('0'), np.array('0'))
  write_sample(tmp_path, '2', np.array('2'), np.array('0'), np.array('0'))
  (tmp_path / 'images' / '2.jpg').write_bytes(b'\xff\xd8 truncated')
  with pytest.raises(ValueError, match=r'2\.jpg: not a readable image'):
    affectnet.read_npy_split(tmp_path)
  records, report = affectnet.read_npy_split(tmp_path, on_error='skip')
  assert [Path(p).stem for p in records.paths] == ['1']
  assert [Path(s['path']).name for s in report.skipped] == ['2.jpg']


def test_skip_mode_reports_every_skipped_file(tmp_path):
  write_sample(tmp_path, '1', np.array('1'), np.array('0'), np.array('0'))
  write_sample(tmp_path, '2', np.array('x'), np.array('0'), np.array('0'))
  write_sample(tmp_path, '3', np.array('2'), None, np.array('0'))
  write_sample(tmp_path, '4', np.array('2'), np.array('0'), np.array('0'),
               image=False)
  with pytest.raises(ValueError, match=r"2_exp\.npy: 'x' is not a number"):
    affectnet.read_npy_split(tmp_path)
  records, report = affectnet.read_npy_split(tmp_path, on_error='skip')
  assert [Path(p).stem for p in records.paths] == ['1']
  reasons = {Path(s['path']).name: s['reason'] for s in report.skipped}
  assert set(reasons) == {'2.jpg', '3.jpg', '4_exp.npy'}
  assert 'not a number' in reasons['2.jpg']
  assert reasons['3.jpg'].endswith('3_val.npy: annotation file missing')
  assert reasons['4_exp.npy'] == 'annotation without an image'


def test_missing_folder_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='images: folder not found'):
    affectnet.read_npy_split(tmp_path)
