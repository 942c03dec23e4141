"""The CPU kernels and bfloat16: the same model, parameters and (within
rounding) numbers as XLA's own convolutions and float32."""

import os
import subprocess
import sys
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest

from fer_jax import models
from fer_jax.configs import default
from tests.conftest import ROOT
from tests.models.conftest import make


class Step(NamedTuple):
  """A training step's results, and its compiled functions of the
  dropout key."""
  loss: float
  grads: dict
  outputs: dict            # training mode
  train_features: Callable[[jax.Array], jax.Array]
  eval_features: Callable[[jax.Array], jax.Array]
  lower: Callable[[], jax.stages.Lowered]  # for other compiler settings


@pytest.fixture(scope='module')
def training_step():
  """compute(name, variables, kernels, dtype): a Step of the multitask loss
  on 4 images of 64 px in training mode, from the same float32 variables;
  each (name, kernels, dtype) compiled once."""
  from fer_jax import losses
  rng = np.random.default_rng(1)
  batch = {'image': rng.normal(size=(4, 64, 64, 3)).astype(np.float32),
           'label': np.array([0, 3, 5, 7], np.int32),
           'va': rng.uniform(-1, 1, (4, 2)).astype(np.float32),
           'va_mask': np.ones(4, bool), 'mask': np.ones(4, bool)}
  done = {}

  def compute(name, variables, kernels='cpu', dtype='float32'):
    if (name, kernels, dtype) in done:
      return done[name, kernels, dtype]
    config = default.get_config().model
    config.name, config.kernels, config.dtype = name, kernels, dtype
    model = models.create_model(config)

    def loss_fn(params, key):
      outputs, _ = model.apply(
          {**variables, 'params': params}, batch['image'], train=True,
          mutable=['batch_stats'], rngs={'dropout': key})
      sums = losses.loss_sums(outputs, batch)
      return losses.normalise(sums, 1.0)['loss'], outputs

    train = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    evaluate = jax.jit(lambda key: model.apply(
        variables, batch['image'], rngs={'dropout': key})['features'])
    (loss, outputs), grads = train(variables['params'], jax.random.PRNGKey(1))
    done[name, kernels, dtype] = Step(
        float(loss), grads, outputs,
        lambda key: train(variables['params'], key)[0][1]['features'],
        evaluate, lambda: train.lower(variables['params'],
                                      jax.random.PRNGKey(1)))
    return done[name, kernels, dtype]

  return compute


def test_bfloat16_step_is_close_to_float32_with_a_float32_head(
    flax_model, training_step):
  """With XLA's own convolutions (model.kernels='library'): bfloat16 is for
  GPUs and TPUs, where 'auto' picks them, and XLA:CPU compiles
  EfficientNet-B0's bfloat16 gradient with the CPU kernels in twice the
  time (29 against 16 s). Measured here: losses within 0.15% (ResNet18)
  and 0.4% (EfficientNet-B0), gradient cosines 0.94 both.
  Training-mode BatchNorm over the last stages' 16 values (2 x 2 maps of
  4 images) amplifies bfloat16's rounding; the bounds leave a margin."""
  name, _, variables = flax_model
  low = training_step(name, variables, 'library', 'bfloat16')
  full = training_step(name, variables, 'library')
  flat = lambda tree: np.concatenate(
      [np.ravel(g) for g in jax.tree.leaves(tree)]).astype(np.float64)
  grad16, grad32 = flat(low.grads), flat(full.grads)
  cosine = grad16 @ grad32 / np.linalg.norm(grad16) / np.linalg.norm(grad32)
  assert low.loss == pytest.approx(full.loss, rel=0.03)
  assert cosine > 0.8
  # The head's outputs are not bfloat16 numbers (8 significant bits) cast
  # to float32, as a bfloat16 head's were.
  for key in ('logits', 'va'):
    value = np.asarray(low.outputs[key])
    as_bf16 = np.asarray(jnp.asarray(value, jnp.bfloat16), np.float32)
    assert value.dtype == np.float32 and np.mean(as_bf16 == value) < 0.5


def test_bfloat16_computes_the_backbone_in_bfloat16():
  model, variables = make('resnet18', 'bfloat16')
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  hlo = jax.jit(model.apply).lower(variables, jnp.ones((2, 32, 32, 3))
                                   ).as_text()
  assert 'bf16' in hlo


def test_only_efficientnet_training_is_random(flax_model, training_step):
  """Stochastic depth drops EfficientNet-B0's blocks in training alone;
  ResNet18 has nothing random (no dropout before the heads here)."""
  name, _, variables = flax_model
  step = training_step(name, variables)
  keys = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
  first, second = (np.asarray(step.train_features(key)) for key in keys)
  assert np.allclose(first, second) == (name == 'resnet18')
  np.testing.assert_array_equal(step.eval_features(keys[0]),
                                step.eval_features(keys[1]))



def test_kernel_choices_share_parameters_outputs_and_gradients(
    flax_model, training_step):
  name, _, variables = flax_model
  x = jnp.zeros((1, 32, 32, 3))
  shapes = {}
  for impl in ('cpu', 'library'):
    config = default.get_config().model
    config.name, config.kernels = name, impl
    shapes[impl] = jax.tree.map(np.shape, jax.eval_shape(
        models.create_model(config).init, jax.random.PRNGKey(0), x))
  assert shapes['cpu'] == shapes['library']
  ours, theirs = (training_step(name, variables, impl)
                  for impl in ('cpu', 'library'))
  key = jax.random.PRNGKey(0)
  np.testing.assert_allclose(ours.eval_features(key),
                             theirs.eval_features(key), rtol=1e-4, atol=1e-5)
  assert_gradients_close(ours.grads, theirs.grads)
  config.kernels = 'fft'
  with pytest.raises(ValueError, match="model.kernels: 'fft'"):
    models.create_model(config).init(jax.random.PRNGKey(0), x)


def assert_gradients_close(grads, want_grads):
  """Gradients equal to float32 rounding. Gradients that cancel (a bias
  before the next BatchNorm) are rounding noise: tolerances scale with
  the largest gradient."""
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grads))
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * scale)


def test_users_compiler_settings_give_the_suites_gradients(training_step):
  """The suite compiles at LLVM -O0 with XLA's older fusion emitters
  (conftest.xla_flags), users at XLA's defaults: -O2 and the fusion
  emitters. ResNet18's training gradient with the CPU kernels ('auto' on
  a CPU), which the other tests check against XLA's convolutions and
  PyTorch, is the same at both (measured: 5e-6 of the largest gradient):
  the numbers checked at the suite's setting are the users'. XLA:CPU's
  code paths can differ: in one program Eigen's convolutions gave
  gradients 10% off at -O0 and right ones at -O2
  (test_eigen_convolutions_gradients_at_o0)."""
  _, variables = make('resnet18')
  step = training_step('resnet18', variables)
  users = step.lower().compile(compiler_options={
      'xla_backend_optimization_level': 2,
      'xla_cpu_use_fusion_emitters': True})
  (loss, _), grads = users(variables['params'], jax.random.PRNGKey(1))
  assert float(loss) == pytest.approx(step.loss, rel=1e-5)
  assert_gradients_close(grads, step.grads)


EIGEN_O0 = ('--xla_cpu_experimental_ynn_fusion_type=-individual_convolution '
            '--xla_backend_optimization_level=0')


@pytest.mark.xfail(jaxlib.__version__ == '0.10.2', strict=True, reason=(
    "jaxlib 0.10.2's XLA:CPU: Eigen's convolutions at -O0 give gradients "
    '1-10% off (tests/models/eigen_o0.py); fer_jax keeps YNNPACK'))
def test_eigen_convolutions_gradients_at_o0():
  """A known XLA:CPU bug, kept so that a jaxlib that fixes it is noticed
  (this test then passes, and fails as an unexpected pass on 0.10.2's
  gate): the float32 gradient of a ResNet18 front on Eigen's convolutions
  at LLVM -O0 within 1e-4 of float64's (YNNPACK: 1e-5)."""
  env = {**os.environ, 'XLA_FLAGS': EIGEN_O0, 'JAX_PLATFORMS': 'cpu'}
  done = subprocess.run([sys.executable, '-m', 'tests.models.eigen_o0'],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert float(done.stdout.split()[-1]) < 1e-4
