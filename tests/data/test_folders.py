"""Class folders (Layout C) and the splits of every layout."""

import json
from pathlib import Path

import numpy as np
import pytest

from fer_jax.configs import default
from fer_jax import config_rules, data, labels
from fer_jax.config_rules import UsageError
from fer_jax.data import folders, index
from tests.data.test_affectnet import (csv_row, data_config, jpeg,
                                       truncated_jpeg, write_csv,
                                       write_sample)


def make_folders(set_dir: Path, files: dict[str, int]) -> None:
  """files: 'class/name.jpg' -> how many copies (name_k.jpg)."""
  for relative, count in files.items():
    for k in range(count):
      path = set_dir / relative.replace('.jpg', f'_{k}.jpg')
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(jpeg())


def read(set_dir: Path, on_error='raise', **overrides):
  config = data_config(set_dir.parent, **overrides)
  return index.to_records(folders.index_folders(set_dir, config), on_error)


def test_names_and_variants_give_labels_and_va_is_masked(tmp_path):
  make_folders(tmp_path / 'train', {'Neutral/a.jpg': 2, 'happy/b.jpg': 1,
                                    'sadness/c.jpg': 1, 'ANGRY/d.jpg': 1,
                                    'surprised/deeper/e.jpg': 1})
  records, report = read(tmp_path / 'train')
  got = {Path(p).relative_to(tmp_path / 'train').as_posix(): int(l)
         for p, l in zip(records.paths, records.labels)}
  assert got == {'Neutral/a_0.jpg': 0, 'Neutral/a_1.jpg': 0,
                 'happy/b_0.jpg': 1, 'sadness/c_0.jpg': 2,
                 'ANGRY/d_0.jpg': 6, 'surprised/deeper/e_0.jpg': 3}
  assert not records.va_mask.any() and not records.va.any()
  assert records.landmarks is None
  assert report.skipped == [] and report.dropped_classes == {}


def test_unknown_class_folder_and_loose_images_never_get_a_label(tmp_path):
  make_folders(tmp_path / 'train', {'happy/a.jpg': 1, 'bored/b.jpg': 2,
                                    'loose.jpg': 1})
  (tmp_path / 'train' / 'happy' / 'cut.jpg').write_bytes(truncated_jpeg())
  with pytest.raises(ValueError, match=r"class folder 'bored' is not one of "
                     r'Neutral, Happy'):
    read(tmp_path / 'train')
  records, report = read(tmp_path / 'train', on_error='skip')
  assert [Path(p).name for p in records.paths] == ['a_0.jpg']
  reasons = {Path(s['path']).name: s['reason'] for s in report.skipped}
  assert set(reasons) == {'b_0.jpg', 'b_1.jpg', 'loose_0.jpg', 'cut.jpg'}
  assert reasons['loose_0.jpg'].endswith('image outside a class folder')
  assert 'not a readable image' in reasons['cut.jpg']


def test_numbered_folders_map_through_class_folders(tmp_path):
  """RAF-DB style: 1 Surprise, 4 Happiness, 7 Neutral."""
  make_folders(tmp_path / 'train', {'1/a.jpg': 1, '4/b.jpg': 1, '7/c.jpg': 1})
  records, _ = read(tmp_path / 'train',
                    class_folders='1:surprise, 4:happiness, 7:neutral')
  assert records.labels.tolist() == [3, 1, 0]
  with pytest.raises(ValueError, match=r"data.class_folders: '4=happy'"):
    read(tmp_path / 'train', class_folders='1:surprise,4=happy')
  with pytest.raises(ValueError, match=r"data.class_folders: '2:bored'"):
    read(tmp_path / 'train', class_folders='2:bored')


def test_a_folders_set_has_the_classes_of_its_folders(tmp_path):
  """data.classes '': the classes with a folder holding an image, in train
  or test, in canonical order; an empty folder or an unknown one is no
  class."""
  make_folders(tmp_path / 'train', {'sad/a.jpg': 1, 'Happy/b.jpg': 1,
                                    'angry/deeper/c.jpg': 1, 'bored/d.jpg': 1})
  make_folders(tmp_path / 'test', {'surprised/e.jpg': 1})
  (tmp_path / 'train' / 'contempt').mkdir()
  (tmp_path / 'train' / 'fear' / 'notes').mkdir(parents=True)
  (tmp_path / 'train' / 'fear' / 'notes' / 'readme.txt').write_text('x')
  config = split_config(tmp_path, 'folders', tmp_path)
  assert labels.run_classes(config) == ('Happy', 'Sad', 'Surprise', 'Anger')
  config.data.classes = 'affectnet8'  # chosen: as named
  assert labels.run_classes(config) == labels.EXPRESSIONS
  config.data.update(classes='', class_folders='sad:fear,happy:neutral')
  assert labels.run_classes(config) == ('Neutral', 'Fear')
  config.data.class_folders = 'happy:happy'
  with pytest.raises(ValueError, match=(
      rf'{tmp_path / "train"}, {tmp_path / "test"}: class folders with '
      'images: Happy; a label space needs 2')):
    labels.run_classes(config)
  config.data.root = str(tmp_path / 'elsewhere')
  with pytest.raises(ValueError, match='data.root: .*elsewhere is not a '
                     'folder'):
    labels.run_classes(config)


def test_a_folders_run_records_the_names_of_its_classes(tmp_path):
  """config.json holds the names, so the run keeps its space whatever the
  folders hold later; a config check names a set without classes."""
  make_folders(tmp_path / 'train', {'neutral/a.jpg': 1, 'fear/b.jpg': 1})
  config = split_config(tmp_path, 'folders', tmp_path)
  assert config_rules.as_json(config)['data']['classes'] == 'Neutral,Fear'
  config.data.root = str(tmp_path / 'train' / 'fear')
  with pytest.raises(UsageError, match='class folders with images: none'):
    config_rules.check(config, None)


# Splits of every layout ---------------------------------------------------

def split_config(tmp_path: Path, layout: str, root: Path):
  config = default.get_config()
  config.data.layout, config.data.root = layout, str(root)
  config.data.index_cache_dir = str(tmp_path / 'index_cache')
  config.data.val_fraction = 0.25
  return config


def test_npy_ids_shared_by_both_sets_stay_distinct_images(tmp_path):
  """Non-contiguous IDs; 17 and 901 exist in train_set and val_set."""
  root = tmp_path / 'affectnet'
  train_ids = [3, 17, 40, 41, 99, 120, 901, 5000]
  for k, i in enumerate(train_ids):
    write_sample(root / 'train_set', str(i), np.array(str(k % 2)),
                 np.array('0.1'), np.array('0.2'))
  for i, code in ((17, '5'), (901, '6'), (77, '10')):
    write_sample(root / 'val_set', str(i), np.array(code), np.array('-0.3'),
                 np.array('0.4'))
  config = split_config(tmp_path, 'npy', root)
  splits, report = data.load_splits(config)
  test = {Path(p).stem: int(l) for p, l in zip(splits['test'].paths,
                                              splits['test'].labels)}
  assert test == {'17': 5, '901': 6}
  train_val = np.concatenate([splits['train'].paths, splits['val'].paths])
  assert sorted(Path(p).stem for p in train_val) == sorted(map(str,
                                                                train_ids))
  assert all('train_set' in p for p in train_val)
  assert len(splits['val']) == 2  # a quarter of each class of 4
  assert report['test']['dropped_classes'] == {'No-Face': 1}
  assert report['test']['class_counts'] == [0, 0, 0, 0, 0, 1, 1, 0]
  json.dumps(report)  # data_report.json is plain JSON


@pytest.mark.parametrize('validation', ['holdout', 'released'])
def test_csv_and_folder_layouts_split_like_the_npy_one(tmp_path,
                                                       validation):
  csv_root = tmp_path / 'csv'
  images = csv_root / 'Manually_Annotated_Images'
  images.mkdir(parents=True)
  rows = []
  for k in range(8):
    (images / f'{k}.jpg').write_bytes(jpeg((60, 60)))
    rows.append(csv_row(f'{k}.jpg', expression=str(k % 2)))
  write_csv(csv_root / 'training.csv', rows)
  write_csv(csv_root / 'validation.csv', [csv_row('0.jpg', expression='3')])
  folder_root = tmp_path / 'folders'
  make_folders(folder_root / 'train', {'neutral/a.jpg': 4, 'happy/b.jpg': 4})
  make_folders(folder_root / 'test', {'surprise/c.jpg': 1})
  for layout, root in (('csv', csv_root), ('folders', folder_root)):
    config = split_config(tmp_path, layout, root)
    config.data.validation = validation
    splits, report = data.load_splits(config)
    released = 'test' if validation == 'holdout' else 'val'
    held = 'val' if validation == 'holdout' else 'test'
    assert [report['classes'][k] for k in splits[released].labels] == [
        'Surprise'], layout  # the folders' own space: Neutral, Happy, Surprise
    assert len(splits['train']) == 6 and len(splits[held]) == 2, layout
    assert np.bincount(splits[held].labels).tolist() == [1, 1], layout
    assert report[released]['num_examples'] == 1


def test_unknown_layout_and_missing_root_are_named(tmp_path):
  config = split_config(tmp_path, 'lmdb', tmp_path)
  with pytest.raises(ValueError, match="data.layout: 'lmdb' is not one of"):
    data.load_splits(config)
  config = split_config(tmp_path, 'csv', '')
  with pytest.raises(ValueError, match='data.root: empty'):
    data.load_splits(config)
