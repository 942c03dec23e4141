"""The CPU kernels and bfloat16: the same model, parameters and (within
rounding) numbers as XLA's own convolutions and float32."""

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import default
from fer_jax import models
from fer_jax.models import efficientnet, layers
from tests.models.conftest import make


class Step(NamedTuple):
  """A training step's results, and its compiled functions of the
  dropout key."""
  loss: float
  grads: dict
  outputs: dict            # training mode
  train_features: Callable[[jax.Array], jax.Array]
  eval_features: Callable[[jax.Array], jax.Array]


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
        evaluate)
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


@pytest.mark.parametrize('kernel,strides,size', [(3, 1, 9), (5, 2, 11),
                                                 (3, 2, 8), (5, 1, 6)])
def test_depthwise_shifted_equals_library_with_gradients(kernel, strides,
                                                         size):
  rng = np.random.default_rng(kernel * 10 + strides)
  x = jnp.asarray(rng.normal(size=(2, size, size, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, 6)), jnp.float32)
  pad = (kernel - 1) // 2

  def run(impl):
    loss = lambda x, w: jnp.sum(jnp.sin(
        efficientnet.DEPTHWISE[impl](x, w, strides, pad)))
    return efficientnet.DEPTHWISE[impl](x, w, strides, pad), jax.grad(
        loss, (0, 1))(x, w)

  (want, want_grads), (got, got_grads) = run('library'), run('cpu')
  out = (size + 2 * pad - kernel) // strides + 1
  assert got.shape == want.shape == (2, out, out, 6)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for g, w_ in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w_, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('kernel,strides,pad', [(3, 2, 1), (5, 2, 2),
                                                (3, 2, 0)])
def test_depthwise_shifted_gradients_on_a_non_square_map(kernel, strides,
                                                         pad):
  """Against the library's grouped convolution. 6 x 11: the strided
  windows end one pixel short of the edge in one axis and not in the
  other, so each axis needs its own padding of dy (on 6 x 10 both axes
  happen to need the same). pad 0: TensorFlow's SAME, padded before."""
  rng = np.random.default_rng(kernel + pad)
  x = jnp.asarray(rng.normal(size=(2, 6, 11, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, 4)), jnp.float32)
  library = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (strides, strides), ((pad, pad), (pad, pad)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=4)
  ours = lambda x, w: efficientnet.depthwise_shifted(x, w, strides, pad)
  grads = lambda conv: jax.grad(
      lambda x, w: jnp.sum(jnp.sin(conv(x, w))), (0, 1))(x, w)
  np.testing.assert_allclose(ours(x, w), library(x, w), rtol=1e-5, atol=1e-5)
  for got, want in zip(grads(ours), grads(library)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_depthwise_kernel_gradient_of_bfloat16_multiplies_in_float32():
  """Against float64 NumPy of the same bfloat16 x and dy; the kernel is
  float32, so its gradient comes back unrounded. Measured: 6e-8 relative
  (float32 products); 1.5e-3 with each product rounded to bfloat16.

  Run op by op: under jit, XLA:CPU's fusion multiplies in float32 whatever
  the program says, which other backends need not do.
  """
  rng = np.random.default_rng(2)
  k, strides, pad = 3, 2, 1
  x = jnp.asarray(rng.normal(size=(4, 10, 10, 8)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(k, k, 1, 8)), jnp.float32)
  with jax.disable_jit():
    y, vjp = jax.vjp(
        lambda w: efficientnet.depthwise_shifted(x, w, strides, pad), w)
    dy = jnp.asarray(rng.normal(size=y.shape), jnp.bfloat16)
    got, = vjp(dy)
  padded = np.pad(np.float64(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  span = strides * (y.shape[1] - 1) + 1
  want = np.array([[np.einsum(
      'bhwc,bhwc->c', padded[:, i:i + span:strides, j:j + span:strides],
      np.float64(dy)) for j in range(k)] for i in range(k)])[:, :, None]
  error = np.linalg.norm(np.float64(got) - want) / np.linalg.norm(want)
  assert got.dtype == jnp.float32 and error < 1e-5


# The first shape is 1.5 MB an image: three chunks of one image each.
@pytest.mark.parametrize('kernel,strides,shape', [
    (3, 1, (3, 128, 128, 24)), (7, 2, (2, 21, 21, 3)), (3, 2, (2, 9, 9, 8))])
def test_conv_matmul_grad_equals_xla_with_gradients(kernel, strides, shape):
  rng = np.random.default_rng(kernel + strides)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, shape[-1], 5)),
                  jnp.float32)
  pad = kernel // 2
  xla = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (strides, strides), ((pad, pad), (pad, pad)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  ours = lambda x, w: layers.conv_matmul_grad(x, w, strides, pad)
  grads = lambda conv: jax.jit(jax.grad(
      lambda x, w: jnp.sum(jnp.sin(conv(x, w))), (0, 1)))(x, w)
  np.testing.assert_allclose(ours(x, w), xla(x, w), rtol=1e-5, atol=1e-4)
  for got, want in zip(grads(ours), grads(xla)):
    np.testing.assert_allclose(got, want, rtol=1e-4,
                               atol=1e-4 * float(np.abs(want).max()))


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
  grads, want_grads = ours.grads, theirs.grads
  # Gradients that cancel (a bias before the next BatchNorm) are rounding
  # noise: tolerances scale with the largest gradient.
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grads))
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * scale)
  config.kernels = 'fft'
  with pytest.raises(ValueError, match="model.kernels: 'fft'"):
    models.create_model(config).init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize('shape,k,strides,pad', [
    ((2, 36, 36, 4), 3, 2, 1), ((2, 9, 10, 3), 3, 2, 1),
    ((1, 7, 7, 2), 2, 2, 0)])
def test_max_pool_gradient_goes_to_the_first_maximum_as_xla_and_torch(
    shape, k, strides, pad):
  """Values from {0, 1, 2}: most windows hold their maximum twice or more,
  so a gradient split between ties, or sent to the last one, fails."""
  rng = np.random.default_rng(k + pad)
  x = rng.integers(0, 3, shape).astype(np.float32)
  ours, ours_vjp = jax.vjp(lambda x: layers.max_pool(x, k, strides, pad), x)
  xla, xla_vjp = jax.vjp(lambda x: nn.max_pool(
      x, (k, k), (strides, strides), ((pad, pad), (pad, pad))), x)
  dy = rng.normal(size=ours.shape).astype(np.float32)
  x_torch = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  y_torch = torch.nn.functional.max_pool2d(x_torch, k, strides, pad)
  y_torch.backward(torch.tensor(dy.transpose(0, 3, 1, 2)))
  np.testing.assert_array_equal(ours, xla)
  np.testing.assert_array_equal(ours, y_torch.detach().numpy().transpose(
      0, 2, 3, 1))
  got, = ours_vjp(dy)
  # Where windows overlap, a pixel sums dy of up to four windows, in
  # another order than XLA's scatter.
  np.testing.assert_allclose(got, xla_vjp(dy)[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got, x_torch.grad.numpy().transpose(0, 2, 3, 1),
                             rtol=1e-6, atol=1e-6)
