"""Label spaces: presets, names and the classes a run keeps."""

import numpy as np

from fer_jax import config_rules, labels
from fer_jax.configs import default
from fer_jax.data import index


def test_presets_names_and_variants_give_canonical_names_in_order():
  assert labels.parse_classes('', 'synthetic') == labels.EXPRESSIONS
  assert labels.parse_classes('', 'rafdb') == labels.PRESETS['rafdb']
  assert labels.parse_classes('AffectNet7', 'npy') == labels.EXPRESSIONS[:7]
  assert labels.parse_classes(' happiness, Angry ,SAD', 'npy') == (
      'Happy', 'Anger', 'Sad')
  # Every preset holds canonical names, each once.
  for name, classes in labels.PRESETS.items():
    assert set(classes) <= set(labels.EXPRESSIONS), name
    assert len(set(classes)) == len(classes), name


def test_config_json_records_the_names_not_the_preset():
  config = default.get_config()
  assert config_rules.as_json(config)['data']['classes'] == ','.join(
      labels.EXPRESSIONS)
  config.data.layout, config.data.classes = 'fer2013', ''
  assert config_rules.as_json(config)['data']['classes'] == (
      'Anger,Disgust,Fear,Happy,Sad,Surprise,Neutral')
  # A run saved with the preset or with the names means the same.
  saved = config_rules.as_json(config)
  config.data.classes = 'fer2013'
  assert config_rules.meaning_changes(saved, config) == {}


def test_codes_outside_the_space_are_dropped_and_counted_by_name():
  codes = np.array([0, 7, 1, 7, 8, 10, 6, 2], np.int16)
  n = len(codes)
  built = {'path': np.array([f'{i}.jpg' for i in range(n)]), 'code': codes,
           'va': np.zeros((n, 2), np.float32),
           'box': np.full((n, 4), np.nan, np.float32),
           'size': np.zeros((n, 2), np.int32), 'mode': np.array([''] * n),
           'format': np.array([''] * n), 'error': np.array([''] * n)}
  classes = ('Sad', 'Neutral', 'Happy', 'Anger')  # any order
  records, report = index.to_records(built, 'raise', classes)
  assert list(records.paths) == ['0.jpg', '2.jpg', '6.jpg', '7.jpg']
  assert records.labels.tolist() == [1, 2, 3, 0]
  assert report.dropped_classes == {'Contempt': 2, 'None': 1, 'No-Face': 1}
  eight, report = index.to_records(built, 'raise')
  assert eight.labels.tolist() == [0, 7, 1, 7, 6, 2]
  assert report.dropped_classes == {'None': 1, 'No-Face': 1}
