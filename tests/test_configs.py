"""Every config loads and describes the experiment it claims."""

import importlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.conftest import NUM_DEVICES, ROOT
from tests.test_steps import fixed_batch, shard

# saved.py reads a run's config.json: tested on its own below.
CONFIGS = sorted(p.stem for p in (ROOT / 'configs').glob('*.py')
                 if p.stem not in ('__init__', 'saved'))


ABLATIONS = sorted(p.stem for p in (ROOT / 'configs' / 'ablations').glob('*.py')
                   if p.stem != '__init__')
# Training class counts as skewed as AffectNet's, for the class weights.
COUNTS = np.array([750, 1340, 250, 140, 64, 38, 250, 37])


def train_step(config, compiled=True):
  """(state before, state after, metrics) of one train step of config at
  32 px, batch 4 over the test's devices, as training builds it; with
  compiled False only traced (jax.eval_shape)."""
  from fer_jax import losses, models, steps
  config = config.copy_and_resolve_references()
  config.data.image_size, config.train.batch_size = 32, 4
  config.model.init_from = ''  # no weights here
  model = models.create_model(config.model, axis_name=steps.AXIS)
  tx = steps.create_optimizer(config.train, steps.learning_rate_fn(
      config.train, 10), 10)
  p_train, _ = steps.pmap_steps(
      model, tx, config, losses.configured_class_weights(config.train,
                                                         COUNTS))
  new_state = lambda: steps.create_train_state(
      model, tx, 32, 0, ema=config.train.ema_decay > 0)
  batch = shard(fixed_batch(4, 32), NUM_DEVICES)
  if not compiled:
    state = jax.eval_shape(new_state)
    replicated = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        (NUM_DEVICES, *x.shape), x.dtype), state)
    return state, *jax.eval_shape(p_train, replicated, batch)
  # Two steps: the first has a learning rate of 0 under a warm-up.
  state = new_state()
  after, metrics = p_train(steps.replicate(state), batch)
  after, metrics = p_train(after, batch)
  return state, steps.unreplicate(after), steps.unreplicate(metrics)


def assert_step_traces(config, label: str = '') -> None:
  """config's train step traces (jax.eval_shape) to a loss per device and
  an 8-class head."""
  _, after, metrics = train_step(config, compiled=False)
  assert metrics['loss'].shape == (NUM_DEVICES,), label
  assert after.params['head']['expression']['kernel'].shape[-1] == 8, label


@pytest.mark.parametrize('name', CONFIGS)
def test_config_checks_builds_its_model_and_trains(name):
  from fer_jax import config_rules
  config = importlib.import_module(f'fer_jax.configs.{name}').get_config()
  if config.data.layout != 'synthetic':
    config.data.root = str(ROOT)  # any folder passes the door
  config_rules.check(config, NUM_DEVICES)
  # Its own backbone traced; its loss terms, class weights, optimiser and
  # schedule compiled and run on tiny_cnn (ResNet18's compile cost 20-40
  # s a config; the backbones' steps are compiled in test_backbones, and
  # both train in the notebook's runs, test_notebook).
  assert_step_traces(config)
  config.model.name = 'tiny_cnn'
  before, after, metrics = train_step(config)
  assert np.isfinite(metrics['loss']) and metrics['loss'] > 0
  assert int(after.step) == 2
  moved = [float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(after.params['head']),
      jax.tree.leaves(before.params['head']))]
  assert max(moved) > 0


@pytest.mark.parametrize('name', ABLATIONS)
def test_every_ablation_run_checks_and_traces_a_train_step(name):
  """Each variant and seed as --mode=ablate would train it; traced, not
  compiled (a variant changes fields whose arithmetic other tests check)."""
  from fer_jax import ablate, config_rules
  config = importlib.import_module(
      f'fer_jax.configs.ablations.{name}').get_config()
  for variant, fields in config.ablate.variants:
    run = ablate.run_config(config.base, fields, config.ablate.seeds[0],
                            config.ablate.seed_fields, variant)
    config_rules.check(run, NUM_DEVICES)
    assert_step_traces(run, variant)


def test_a_saved_config_reads_back_as_it_was(tmp_path):
  from fer_jax import config_rules, files
  config = importlib.import_module(
      'fer_jax.configs.resnet18_affectnet').get_config()
  files.write_json(tmp_path / 'config.json', config_rules.as_json(config))
  again = importlib.import_module('fer_jax.configs.saved').get_config(
      str(tmp_path / 'config.json'))
  assert config_rules.as_json(again) == config_rules.as_json(config)


def test_reference_study_protocols():
  resnet = importlib.import_module(
      'fer_jax.configs.resnet18_affectnet').get_config()
  effnet = importlib.import_module(
      'fer_jax.configs.efficientnet_b0_affectnet').get_config()
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
