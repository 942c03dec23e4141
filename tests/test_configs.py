"""Every config loads and describes the experiment it claims."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# saved.py reads a run's config.json: tested on its own below.
CONFIGS = sorted(p.stem for p in (ROOT / 'configs').glob('*.py')
                 if p.stem not in ('__init__', 'saved'))


@pytest.mark.parametrize('name', CONFIGS)
def test_config_loads_with_the_contract_fields(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  for field in ('model.name', 'model.dtype', 'model.init_from', 'data.layout',
                'data.root', 'data.image_size', 'data.on_error',
                'data.num_workers', 'train.num_epochs', 'train.batch_size',
                'train.seed'):
    section, key = field.split('.')
    assert key in config[section], field


def test_a_saved_config_reads_back_as_it_was(tmp_path):
  from fer_jax import config_rules, files
  config = importlib.import_module('configs.resnet18_affectnet').get_config()
  files.write_json(tmp_path / 'config.json', config_rules.as_json(config))
  again = importlib.import_module('configs.saved').get_config(
      str(tmp_path / 'config.json'))
  assert config_rules.as_json(again) == config_rules.as_json(config)


def test_reference_study_protocols():
  resnet = importlib.import_module('configs.resnet18_affectnet').get_config()
  effnet = importlib.import_module(
      'configs.efficientnet_b0_affectnet').get_config()
  assert (resnet.model.name, resnet.data.layout, resnet.data.image_size,
          resnet.train.num_epochs, resnet.data.validation) == (
              'resnet18', 'npy', 224, 10, 'holdout')
  assert resnet.train.early_stopping_patience > 0
  assert (effnet.model.name, effnet.data.image_size, effnet.train.num_epochs,
          effnet.data.validation) == ('efficientnet_b0', 224, 20, 'released')


def test_main_rejects_predict_without_input_and_unknown_fields():
  run = lambda *args: subprocess.run(
      [sys.executable, 'main.py', *args], cwd=ROOT, capture_output=True,
      text=True, timeout=120)
  result = run('--mode=predict')
  assert result.returncode != 0 and '--input' in result.stderr
  result = run('--config.train.num_epoch=3')
  assert result.returncode != 0 and 'num_epoch' in result.stderr
