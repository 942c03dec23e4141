"""A trained run deployed from its workdir alone: Recognizer.from_workdir,
--mode=predict and --mode=export with the training data moved away."""

import csv
import json
import subprocess
import sys

import pytest

import fer_jax
from fer_jax import export, predict, training
from fer_jax.configs import default
from tests.conftest import ROOT, tiny_config
from tests.test_label_spaces import RAFDB, write_rafdb


@pytest.fixture(scope='module')
def moved_run(tmp_path_factory):
  """A one-epoch RAF-DB run whose data set was then moved away: (config,
  workdir, the data's new place)."""
  root = write_rafdb(tmp_path_factory.mktemp('sets') / 'raf-basic', 3, 1)
  config = tiny_config(tmp_path_factory.mktemp('cache'))
  config.data.layout, config.data.root = 'rafdb', str(root)
  config.train.num_epochs = 1
  workdir = tmp_path_factory.mktemp('rafdb_run')
  training.train_and_evaluate(config, str(workdir))
  moved = root.rename(root.with_name('moved'))
  return config, workdir, moved


@pytest.fixture
def command_line_config(tmp_path, monkeypatch):
  """The default config, as main.py passes it, in an empty folder (where
  its synthetic set would be generated, under data/)."""
  monkeypatch.chdir(tmp_path)
  return default.get_config()


def test_recognizer_predicts_without_the_training_data(moved_run, photos):
  _, workdir, _ = moved_run
  rec = fer_jax.Recognizer.from_workdir(workdir)
  face, = rec.predict(photos['astronaut'])
  assert rec.classes == RAFDB and face.expression in RAFDB
  assert rec.config.data.layout == 'rafdb'  # the run's: its faces


def test_command_line_inference_settings_are_honoured(moved_run,
                                                      command_line_config):
  _, workdir, _ = moved_run
  config = command_line_config
  config.train.eval_batch_size, config.eval.tta = 4, 'flip'
  config.predict.detector, config.model.kernels = 'none', 'library'
  rec = fer_jax.Recognizer.from_workdir(workdir, tta='flip', config=config)
  assert rec.config.train.eval_batch_size == 4
  assert rec.config.eval.tta == 'flip' and rec.detector is None
  assert rec.config.model.kernels == 'library'
  saved = json.loads((workdir / 'config.json').read_text())
  assert rec.config.data.root == saved['data']['root']  # not read


def test_predict_mode_writes_predictions_without_the_training_data(
    moved_run, command_line_config, photos, tmp_path):
  _, workdir, _ = moved_run
  output = predict.predict(command_line_config, str(workdir),
                           str(photos['astronaut']))
  row, = csv.DictReader(open(output))
  assert row['expression'] in RAFDB
  assert list(row) == predict.header(RAFDB)
  assert not (tmp_path / 'data').exists()  # no synthetic set generated


def test_export_mode_writes_the_model_without_the_training_data(
    moved_run, command_line_config, tmp_path):
  _, workdir, _ = moved_run
  folder = export.export(command_line_config, workdir)
  info = json.loads((folder / export.INFO_FILE).read_text())
  assert info['classes'] == list(RAFDB)
  assert info['files'] == {'stablehlo': export.STABLEHLO_FILE,
                           'onnx': export.ONNX_FILE}
  assert (folder / export.STABLEHLO_FILE).stat().st_size
  assert (folder / export.ONNX_FILE).stat().st_size
  assert not (tmp_path / 'data').exists()  # no synthetic set generated


def test_main_predicts_and_warns_of_data_fields_it_does_not_read(
    moved_run, photos, tmp_path):
  """`--mode=predict` with a data set named that is not there: the run's
  faces all the same, and a line that says the data fields go unread."""
  _, workdir, _ = moved_run
  run = subprocess.run(
      [sys.executable, str(ROOT / 'main.py'), '--mode=predict',
       f'--workdir={workdir}', f"--input={photos['astronaut']}",
       '--config.data.layout=rafdb', '--config.data.root=/nowhere'],
      cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert ('--mode=predict reads no data and takes the run\'s data fields: '
          '--config.data.layout, --config.data.root not read') in run.stderr
  assert 'Wrote 1 predictions (1 inputs)' in run.stdout
  assert not (tmp_path / 'data').exists()
