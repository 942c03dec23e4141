"""The CPU kernels' operations alone, each against XLA's own (and PyTorch's
or float64 NumPy where they differ): depthwise convolutions as shifted sums,
the matmul kernel gradient, max pooling's gradient."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fer_jax.models import efficientnet, layers


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
