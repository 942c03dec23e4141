"""--mode=export: ONNX and StableHLO graphs that compute what evaluation
computes, for any batch size."""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime  # CI installs it (requirements-nodeps.txt): never skipped
import pytest

from fer_jax import data, export, inference, models, steps
from fer_jax.config_rules import UsageError
from fer_jax.data import pipeline
from fer_jax.labels import EXPRESSIONS
from tests.conftest import tiny_config

SIZE = 32
BATCHES = (3, 2)  # two sizes: the batch dimension is dynamic


def random_variables(model, seed: int) -> dict:
  """Fixed random variables of the model, with BatchNorm statistics and
  scales far from their initial 0 and 1."""
  shapes = jax.eval_shape(functools.partial(model.init, train=False),
                          jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == 'kernel':
      value = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
    elif name in ('var', 'scale'):
      value = rng.uniform(0.5, 2.0, shape)
    else:  # biases, BatchNorm means
      value = rng.normal(0, 0.2, shape)
    return value.astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


# tf_efficientnet_b0: the HSEmotion import's (TensorFlow's SAME padding),
# which its README example exports.
@pytest.fixture(scope='module', params=['resnet18', 'efficientnet_b0',
                                         'tf_efficientnet_b0'])
def exported(request, tmp_path_factory):
  """A model with random variables: the uint8 images, evaluation's
  outputs on them, and the exported function and StableHLO artifact."""
  config = tiny_config(tmp_path_factory.mktemp('unused'))
  config.model.name = request.param
  config.data.image_size = SIZE
  model = models.create_model(config.model)  # evaluation's kernels ('auto')
  variables = random_variables(model, seed=1)

  @jax.jit
  def evaluation(variables, images):  # as steps.eval_step computes them
    x = steps.normalise_images(images, config.data.mean_rgb,
                               config.data.std_rgb)
    out = model.apply(variables, x, train=False)
    return jax.nn.softmax(out['logits']), out['logits'], out['va']

  images = np.random.default_rng(2).integers(
      0, 256, (sum(BATCHES), SIZE, SIZE, 3), np.uint8)
  expected = [np.asarray(x) for x in evaluation(variables, images)]
  assert np.abs(expected[1]).max() > 0.5  # outputs far from trivial
  fn = export.serving_fn(config, variables)
  return {'images': images, 'expected': expected, 'fn': fn,
          'stablehlo': export.stablehlo_bytes(fn, SIZE)}


def batches(exported):
  """(images, expected outputs) of each batch size."""
  start = 0
  for size in BATCHES:
    rows = slice(start, start + size)
    yield exported['images'][rows], [x[rows] for x in exported['expected']]
    start += size


def test_stablehlo_computes_evaluation_for_any_batch(exported):
  restored = jax.export.deserialize(bytearray(exported['stablehlo']))
  assert str(restored.in_avals[0].shape[0]) == 'B'
  for images, expected in batches(exported):
    got = restored.call(images)
    assert len(got) == 3
    for a, b in zip(got, expected):
      np.testing.assert_allclose(np.asarray(a), b, atol=1e-4, rtol=0)


def test_onnx_computes_evaluation_for_any_batch(exported):
  session = onnxruntime.InferenceSession(
      export.onnx_bytes(exported['fn'], SIZE),
      providers=['CPUExecutionProvider'])
  assert [i.name for i in session.get_inputs()] == ['images']
  assert session.get_inputs()[0].shape == ['B', SIZE, SIZE, 3]
  assert session.get_inputs()[0].type == 'tensor(uint8)'
  assert [o.name for o in session.get_outputs()] == list(export.OUTPUT_NAMES)
  for images, expected in batches(exported):
    got = session.run(None, {'images': images})
    for a, b in zip(got, expected):
      np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_rewrites_equal_the_primitives_they_replace():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 7, 6, 3)).astype(np.float32)
  x[0, 0, 0, 0], x[1, 3, 2, 1] = -np.inf, np.nan
  for window, strides, padding in (((1, 3, 3, 1), (1, 2, 2, 1),
                                    ((0, 0), (1, 1), (1, 1), (0, 0))),
                                   ((1, 2, 3, 1), (1, 1, 2, 1),
                                    ((0, 0), (0, 1), (2, 0), (0, 0)))):
    want = jax.lax.reduce_window(x, -np.inf, jax.lax.max, window, strides,
                                 padding)
    got = export._window_max(x, window, strides, padding, (1,) * 4,
                             (1,) * 4)
    np.testing.assert_array_equal(got, want)
  config = ((0, 0, 0), (2, -1, 0), (0, 3, 0), (-1, 1, 0))
  np.testing.assert_array_equal(
      export._padded(x, np.float32(5), config),
      jax.lax.pad(x, np.float32(5), config))


def test_evaluation_reads_the_ema_weights_when_kept():
  plain = steps.TrainState(step=0, params='p', batch_stats='s', opt_state=(),
                           rng=None)
  assert steps.eval_variables(plain) == {'params': 'p', 'batch_stats': 's'}
  ema = plain.replace(ema_params='ep', ema_batch_stats='es')
  assert steps.eval_variables(ema) == {'params': 'ep', 'batch_stats': 'es'}


def test_export_of_a_trained_run(finished):
  config, workdir, metrics = finished
  folder = export.export(config, workdir, None)
  step = metrics['checkpoint_step']
  assert folder == workdir / 'report' / 'export' / f'model-step{step}'
  assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]
  assert sorted(p.name for p in folder.iterdir()) == [
      'model.jax_export', 'model.json', 'model.onnx']
  info = json.loads((folder / 'model.json').read_text())
  assert info['files'] == {'stablehlo': 'model.jax_export',
                           'onnx': 'model.onnx'}
  assert info['classes'] == list(EXPRESSIONS)
  assert [o['name'] for o in info['outputs']] == ['probs', 'logits', 'va']
  assert info['image_size'] == config.data.image_size
  assert info['mean_rgb'] == list(config.data.mean_rgb)
  assert info['std_rgb'] == list(config.data.std_rgb)
  assert info['step'] == step and info['workdir'] == str(workdir.resolve())
  assert info['training_rules'] == steps.TRAINING_RULES
  # Evaluation's own path on a few test images (as many as export checked
  # ONNX with, so the artifact compiled then comes from XLA's disk cache).
  trained = inference.trained_config(config, workdir)
  state, p_eval, _ = inference.restore(trained, workdir, None)
  splits, _ = data.load_splits(config)
  few = splits['test'].subset(np.arange(export.CHECK_BATCH_SIZE))
  batch = next(pipeline.eval_batches(few, trained, jax.local_device_count()))
  out = jax.device_get(p_eval(state, batch))
  keep = batch['mask'].reshape(-1)
  images = batch['image'].reshape(-1, *batch['image'].shape[2:])[keep]
  probs = out['probs'].reshape(-1, len(EXPRESSIONS))[keep]
  va = out['va'].reshape(-1, 2)[keep]
  session = onnxruntime.InferenceSession(str(folder / 'model.onnx'))
  restored = jax.export.deserialize(
      bytearray((folder / 'model.jax_export').read_bytes()))
  for got in (session.run(None, {'images': images}),
              [np.asarray(x) for x in restored.call(images)]):
    np.testing.assert_allclose(got[0], probs, atol=1e-4, rtol=0)
    np.testing.assert_allclose(jax.nn.softmax(got[1]), probs, atol=1e-4,
                               rtol=0)
    np.testing.assert_allclose(got[2], va, atol=1e-4, rtol=0)
  before = (folder / 'model.onnx').read_bytes()
  with pytest.raises(UsageError, match=f'model-step{step}: exists'):
    export.export(config, workdir, None)
  assert (folder / 'model.onnx').read_bytes() == before
  assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


def test_export_without_onnx_packages_writes_stablehlo(finished, monkeypatch):
  config, workdir, _ = finished
  step = min(int(p.name) for p in (workdir / 'checkpoints').iterdir()
             if p.name.isdigit())

  def missing():
    raise UsageError(f'ONNX export needs ...: {export.INSTALL}')
  monkeypatch.setattr(export, '_onnx_packages', missing)
  with pytest.raises(UsageError, match='model.jax_export only; .*' +
                     re.escape(export.INSTALL)):
    export.export(config, workdir, step)
  folder = workdir / 'report' / 'export' / f'model-step{step}'
  assert sorted(p.name for p in folder.iterdir()) == [
      'model.jax_export', 'model.json']
  info = json.loads((folder / 'model.json').read_text())
  assert info['files'] == {'stablehlo': 'model.jax_export'}
  assert info['step'] == step


def test_export_refuses_a_workdir_without_checkpoints(trained, tmp_path):
  config, workdir, _ = trained
  (tmp_path / 'config.json').write_bytes(
      (workdir / 'config.json').read_bytes())
  with pytest.raises(UsageError, match=f'{tmp_path / "checkpoints"}: not '
                     'found'):
    export.export(config, tmp_path, None)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json']
