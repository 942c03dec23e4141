"""The config checked at the door, compared and merged."""

import importlib
import subprocess
import sys

import pytest

from fer_jax import config_rules
from fer_jax.config_rules import UsageError
from fer_jax.configs import default
from tests.conftest import NUM_DEVICES, ROOT


def with_value(config, field: str, value):
  """config with field set to value, whatever the field's type."""
  *parents, name = field.split('.')
  node = config
  for part in parents:
    node = node[part]
  with config.ignore_type():
    node[name] = value
  return config


@pytest.mark.parametrize('name', ['default', 'resnet18_affectnet',
                                  'efficientnet_b0_affectnet', 'affectnet7',
                                  'rafdb', 'fer2013', 'ferplus'])
def test_shipped_configs_pass(name, tmp_path):
  config = importlib.import_module(f'fer_jax.configs.{name}').get_config()
  config.data.root = config.data.root or str(tmp_path)
  config_rules.check(config, NUM_DEVICES)


@pytest.mark.parametrize('field,value,message', [
    ('train.batch_size', 0, r'train.batch_size: 0 is not an integer in '
     r'\[1, inf\)'),
    ('train.batch_size', 3, 'train.batch_size: 3 is not divisible by the 2 '
     'devices'),
    ('train.eval_batch_size', 5, 'train.eval_batch_size: 5 is not divisible'),
    ('train.batch_size', True, 'train.batch_size: True is not an integer'),
    ('train.num_epochs', 2.5, 'train.num_epochs: 2.5 is not an integer'),
    ('train.learning_rate', -0.1, r'train.learning_rate: -0.1 is not a '
     r'number in \(0, inf\)'),
    ('train.learning_rate', '1e-3', "train.learning_rate: '1e-3' is not a "
     'number'),
    ('model.name', 'resnet50', "model.name: 'resnet50' is not one of "
     "'efficientnet_b0', 'resnet18'"),
    ('model.dtype', 'float16', "model.dtype: 'float16' is not one of"),
    ('model.dropout_rate', 1.0, r'model.dropout_rate: 1.0 is not a number '
     r'in \[0, 1\)'),
    ('data.image_size', 8, r'data.image_size: 8 is not an integer in \[16'),
    ('data.val_fraction', 1.0, r'data.val_fraction: 1.0 is not a number in '
     r'\(0, 1\)'),
    ('data.sampler', 'weighted', "data.sampler: 'weighted' is not one of "
     "'uniform', 'balanced'"),
    ('data.on_error', 'ignore', "data.on_error: 'ignore'"),
    ('data.augment.crop_scale', (0.9, 0.5), r'data.augment.crop_scale: '
     r'\(0.9, 0.5\) is not a pair'),
    ('eval.tta', 'five_crop', "eval.tta: 'five_crop' is not one of 'none', "
     "'flip'"),
    ('train.va_loss', 'l1', "train.va_loss: 'l1' is not one of 'mse'"),
    ('train.best_metric', 'val_f1', "train.best_metric: 'val_f1' is not one "
     "of .*'val_macro_f1'"),
    ('train.best_mode', 'up', "train.best_mode: 'up'"),
    ('train.ema_decay', 1.0, r'train.ema_decay: 1.0 is not a number in '
     r'\[0, 1\)'),
    ('train.keep_checkpoints', 0, 'train.keep_checkpoints: 0'),
    ('train.optimizer', 'lion', "train.optimizer: 'lion'"),
    ('data.layout', 'npy', 'data.root: empty'),
    ('data.layout', 'affectnet', "data.layout: 'affectnet' is not one of "
     "'synthetic', 'npy', 'csv', 'folders', 'rafdb', 'fer2013', 'ferplus'"),
    ('data.classes', 'Neutral,Happy,Bored', "data.classes: 'Bored' is not an "
     'expression'),
    ('data.classes', 'Happy,happiness', "data.classes: 'Happy,happiness' "
     'names a class twice'),
    ('data.classes', 'Happy', 'fewer than 2 classes'),
    ('data.classes', 7, 'data.classes: 7 is not a string'),
    ('data.layout', 'rafdb', 'data.root: empty'),
    ('data.ferplus_labels', 'soft', "data.ferplus_labels: 'soft' is not one "
     "of 'majority', 'probability'"),
])
def test_bad_values_are_named_at_the_door(field, value, message):
  config = with_value(default.get_config(), field, value)
  with pytest.raises(UsageError, match=message):
    config_rules.check(config, NUM_DEVICES)


def test_a_missing_data_folder_is_named():
  config = default.get_config()
  config.data.layout, config.data.root = 'npy', '/nowhere/affectnet'
  with pytest.raises(UsageError, match='data.root: /nowhere/affectnet is '
                     'not a folder'):
    config_rules.check(config, NUM_DEVICES)


def test_a_config_that_reads_no_data_needs_no_data_folder():
  """Predict and export: a run's config whose data set is gone (or whose
  root was never given) passes; its other data fields are still checked."""
  config = default.get_config()
  config.data.layout, config.data.root = 'rafdb', '/nowhere/raf-basic'
  config_rules.check(config, NUM_DEVICES, training=False, reads_data=False)
  config.data.root = ''
  config_rules.check(config, NUM_DEVICES, training=False, reads_data=False)
  config.data.rafdb_images = 'cropped'
  with pytest.raises(UsageError, match="data.rafdb_images: 'cropped' is not "
                     "one of 'aligned', 'original'"):
    config_rules.check(config, NUM_DEVICES, training=False, reads_data=False)


def test_deploy_takes_inference_settings_and_no_data_field():
  fields = set(config_rules.DEPLOY_FIELDS)
  assert {'train.eval_batch_size', 'eval.tta', 'model.kernels',
          'predict.detector', 'predict.smoothing'} <= fields
  assert not any(f.startswith('data.') for f in fields)


def test_rules_between_fields():
  config = default.get_config()
  config.data.layout, config.data.root = 'fer2013', '/'
  config.train.best_metric = 'val_valence_ccc'
  with pytest.raises(UsageError, match="train.best_metric: 'val_valence_ccc' "
                     "needs valence/arousal labels, which data.layout "
                     "'fer2013' has not"):
    config_rules.check(config, NUM_DEVICES)
  config = default.get_config()
  config.train.schedule = 'step'
  config.train.step_decay_epochs = (1, 20)
  with pytest.raises(UsageError, match=r'train.step_decay_epochs: \(1, 20\) '
                     r'must all come after train.warmup_epochs \(1.0\)'):
    config_rules.check(config, NUM_DEVICES)
  config.train.warmup_epochs = 0.5
  config_rules.check(config, NUM_DEVICES)
  # Inference on other devices: only its own batch has to divide them.
  config.train.batch_size = 3
  config_rules.check(config, NUM_DEVICES, training=False)
  with pytest.raises(UsageError, match='train.batch_size: 3 is not divisible'):
    config_rules.check(config, NUM_DEVICES)


# Command lines a user may type wrong, each with what its one line names.
BAD_COMMAND_LINES = [
    (['--config.train.batch_size=0'],
     'fer_jax: train.batch_size: 0 is not an integer in [1, inf)'),
    (['--config.train.num_epochs=abc'], 'flag --config.train.num_epochs=abc'),
    (['--config.data.image_size=1e9'], 'flag --config.data.image_size=1e9'),
    (['--config.nonexistent=1'], 'names no field of the config'),
    (['--config=configs/missing.py'], "'configs/missing.py'"),
    (['--config=README.md'], '--config: '),
    (['--config.train.step_decay_epochs=(1,x)'], 'train.step_decay_epochs'),
    (['--config.data.classes=Happy,Happy'], 'data.classes'),
    (['--config.data.layout=rafdb'], 'data.root: empty'),
    (['--config.data.augment.crop_scale=(0.9,0.1)'],
     'data.augment.crop_scale'),
    (['--config.model.name=vgg'], "model.name: 'vgg'"),
    (['--mode=bogus'], 'flag --mode=bogus'),
]


def test_bad_command_lines_are_refused_in_one_line_writing_nothing(
    tmp_path):
  """Each in a process of its own (all at once): exit status 1, one line
  on stderr naming the flag or field, no traceback, no workdir."""
  runs = [subprocess.Popen(
      [sys.executable, 'main.py', f'--workdir={tmp_path / str(i)}', *args],
      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
          for i, (args, _) in enumerate(BAD_COMMAND_LINES)]
  for i, (run, (args, named)) in enumerate(zip(runs, BAD_COMMAND_LINES)):
    _, stderr = run.communicate(timeout=300)
    lines = [l for l in stderr.splitlines() if l.strip() and
             not l.startswith(('I1', 'W1'))]  # absl's log lines
    assert run.returncode == 1, (args, stderr)
    assert len(lines) == 1 and lines[0].startswith('fer_jax: '), (args,
                                                                  stderr)
    assert named in lines[0], (args, lines[0])
    assert not (tmp_path / str(i)).exists()


def test_meaning_changes_leave_out_how_fields_and_other_versions():
  config = default.get_config()
  saved = config_rules.as_json(config)
  saved['train']['num_epochs'] = 10              # how long: allowed
  saved['data']['num_workers'] = 8               # how fast: allowed
  saved['data']['root'] = '/mnt/elsewhere'       # where: allowed
  saved['train']['a_field_of_old'] = 1           # another version's
  del saved['eval']                              # an older run's
  saved['model']['hidden_size'] = 256            # what it means
  assert config_rules.meaning_changes(saved, config) == {
      'model.hidden_size': (256, 0)}
  changes = config_rules.changes(saved, config)
  assert changes['train.num_epochs'] == (10, 3)
  assert changes['eval.tta'] == (None, 'none')


def test_inference_takes_the_run_s_model_and_the_command_line_s_data():
  config = default.get_config()
  saved = config_rules.as_json(config)
  saved['model']['name'] = 'efficientnet_b0'
  saved['data']['validation'] = 'released'
  saved['data']['mean_rgb'] = [0.5, 0.5, 0.5]
  saved['data']['root'] = '/where/it/trained'
  saved['eval']['tta'] = 'flip'
  del saved['train']['sam_rho']                  # an older run's
  config.data.root = '/where/it/is/now'
  config.train.eval_batch_size = 64
  config.train.sam_rho = 0.05
  merged = config_rules.merged(saved, config)
  assert merged.model.name == 'efficientnet_b0'
  assert merged.data.validation == 'released'
  assert merged.data.mean_rgb == (0.5, 0.5, 0.5)
  assert merged.data.root == '/where/it/is/now'
  assert merged.eval.tta == 'none'
  assert merged.train.eval_batch_size == 64
  assert merged.train.sam_rho == 0.05
  assert config.model.name == 'resnet18'  # not changed in place
