"""--mode=predict on image files of any size and colour mode."""

import csv

import numpy as np
import pytest
from PIL import Image

from fer_jax import data, predict
from fer_jax.config_rules import UsageError


def test_predictions_csv_matches_evaluation_and_skips_broken_files(
    trained, tmp_path, capsys):
  config, workdir, _ = trained
  splits, _ = data.load_splits(config)
  folder = tmp_path / 'faces'
  (folder / 'nested').mkdir(parents=True)
  test = splits['test']
  for i in range(3):
    Image.open(test.paths[i]).save(folder / f'{i}.png')
  # Another size and a grayscale image: resized and converted.
  Image.open(test.paths[3]).resize((50, 50)).save(folder / 'nested' / 'big.jpg')
  Image.open(test.paths[4]).convert('L').save(folder / 'nested' / 'gray.jpg')
  (folder / 'broken.jpg').write_bytes(b'not an image')
  whole = open(test.paths[5], 'rb').read()  # OpenCV would decode half of it
  (folder / 'cut.jpg').write_bytes(whole[:len(whole) // 2])
  (folder / 'notes.txt').write_text('ignored')
  output = predict.predict(config, str(workdir), str(folder))
  rows = list(csv.DictReader(open(output)))
  assert [r['path'].split('faces/')[1] for r in rows] == [
      '0.png', '1.png', '2.png', 'nested/big.jpg', 'nested/gray.jpg']
  header = rows[0].keys()
  assert list(header)[:3] == ['path', 'expression_id', 'expression']
  assert list(header)[-2:] == ['valence', 'arousal']
  for row in rows:
    probs = np.array([float(row[f'prob_{n}']) for n in
                      ('Neutral', 'Happy', 'Sad', 'Surprise', 'Fear',
                       'Disgust', 'Anger', 'Contempt')])
    assert probs.sum() == pytest.approx(1, abs=1e-4)
    assert int(row['expression_id']) == probs.argmax()
    assert -1 <= float(row['valence']) <= 1
  out = capsys.readouterr().out
  assert 'Skipped 2 unreadable files' in out
  assert 'broken.jpg' in out and 'cut.jpg' in out
  skipped = list(csv.DictReader(open(output.parent / 'skipped.csv')))
  assert sorted(r['path'].split('faces/')[1] for r in skipped) == [
      'broken.jpg', 'cut.jpg']


def test_predict_single_file_and_missing_input(trained, tmp_path):
  config, workdir, _ = trained
  splits, _ = data.load_splits(config)
  output = predict.predict(config, str(workdir), splits['test'].paths[0])
  assert len(list(csv.DictReader(open(output)))) == 1
  with pytest.raises(UsageError, match='--input: .*nowhere'):
    predict.predict(config, str(workdir), str(tmp_path / 'nowhere'))
