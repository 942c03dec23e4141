"""--mode=predict on image files of any size and colour mode."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fer_jax import data, inference, predict
from fer_jax.config_rules import UsageError
from fer_jax.labels import EXPRESSIONS


def test_predictions_match_evaluation_and_broken_files_are_skipped(
    finished, tmp_path, capsys):
  config, workdir, _ = finished
  splits, _ = data.load_splits(config)
  test = splits['test']
  folder = tmp_path / 'faces'
  (folder / 'nested').mkdir(parents=True)
  for i in range(6):  # the test split's own files, byte for byte
    shutil.copy(test.paths[i], folder / f'{i}{Path(test.paths[i]).suffix}')
  # Another size and a grayscale image: resized and converted.
  Image.open(test.paths[6]).resize((50, 50)).save(folder / 'nested' / 'big.jpg')
  Image.open(test.paths[7]).convert('L').save(folder / 'nested' / 'gray.jpg')
  (folder / 'broken.jpg').write_bytes(b'not an image')
  whole = open(test.paths[8], 'rb').read()  # OpenCV would decode half of it
  (folder / 'cut.jpg').write_bytes(whole[:len(whole) // 2])
  (folder / 'notes.txt').write_text('ignored')
  output = predict.predict(config, str(workdir), str(folder))
  rows = list(csv.DictReader(open(output)))
  names = [r['path'].split('faces/')[1] for r in rows]
  assert names[6:] == ['nested/big.jpg', 'nested/gray.jpg'] and len(rows) == 8
  header = rows[0].keys()
  assert list(header)[:3] == ['path', 'expression_id', 'expression']
  assert list(header)[-2:] == ['valence', 'arousal']
  probs = np.array([[float(row[f'prob_{name}']) for name in EXPRESSIONS]
                    for row in rows])
  va = np.array([[float(row['valence']), float(row['arousal'])]
                 for row in rows])
  np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
  assert [int(row['expression_id']) for row in rows] == list(
      probs.argmax(1))
  # Evaluation's path (evaluate.evaluate's) on the same six images.
  trained_config = inference.trained_config(config, workdir)
  state, p_eval, _ = inference.restore(trained_config, workdir, None)
  evaluated = inference.predict_records(p_eval, state,
                                        test.subset(np.arange(6)),
                                        trained_config)
  order = [int(Path(name).stem) for name in names[:6]]
  np.testing.assert_allclose(probs[:6], evaluated['probs'][order], atol=1e-6)
  np.testing.assert_allclose(va[:6], evaluated['va'][order], atol=1e-6)
  out = capsys.readouterr().out
  assert 'Skipped 2 unreadable files' in out
  assert 'broken.jpg' in out and 'cut.jpg' in out
  skipped = list(csv.DictReader(open(output.parent / 'skipped.csv')))
  assert sorted(r['path'].split('faces/')[1] for r in skipped) == [
      'broken.jpg', 'cut.jpg']


def test_predict_single_file_and_missing_input(finished, tmp_path):
  config, workdir, _ = finished
  splits, _ = data.load_splits(config)
  output = predict.predict(config, str(workdir), splits['test'].paths[0])
  assert len(list(csv.DictReader(open(output)))) == 1
  with pytest.raises(UsageError, match='--input: .*nowhere'):
    predict.predict(config, str(workdir), str(tmp_path / 'nowhere'))
