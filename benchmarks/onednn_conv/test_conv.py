"""Checks the oneDNN convolution against lax.conv_general_dilated.

Outputs and both gradients for ResNet18's layer shapes at 72 px (batch 2),
odd sizes with stride 2, the 7x7 stem on 3 channels and strides that do not
divide, in both weight layouts; then under pmap on 2 host devices. Prints
each error and fails above 1e-4 (relative to the largest reference value).

  DNNL_CONV_LIB=$BUILD/libdnnl_conv.so python test_conv.py

Also collected by pytest; the tests skip if the library is not built.
"""

import os
import sys

# Two host devices for the pmap check; must be set before jax is imported.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=2')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import dnnl_conv  # noqa: E402  (this directory's, or pip install ./pkg's)

TOLERANCE = 1e-4
SHAPES = (  # batch, height = width, C_in, C_out, kernel, stride, padding
    (2, 72, 3, 64, 7, 2, 3), (2, 71, 3, 8, 7, 2, 3),
    (2, 18, 64, 64, 3, 1, 1), (2, 18, 64, 128, 3, 2, 1),
    (2, 9, 128, 128, 3, 1, 1), (2, 9, 128, 256, 3, 2, 1),
    (2, 5, 256, 256, 3, 1, 1), (2, 5, 256, 512, 3, 2, 1),
    (2, 3, 512, 512, 3, 1, 1), (2, 18, 64, 128, 1, 2, 0),
    (2, 9, 128, 256, 1, 2, 0), (2, 5, 256, 512, 1, 2, 0),
    (3, 9, 5, 7, 3, 2, 1), (1, 5, 4, 6, 3, 2, 1), (2, 8, 4, 6, 1, 1, 0),
    (2, 10, 4, 6, 5, 3, 2), (2, 7, 4, 6, 2, 2, 0),
)


def relative_error(a, b) -> float:
  """max |a - b| / max |b|, in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _require_library():
  if not dnnl_conv.AVAILABLE:
    import pytest  # pylint: disable=import-outside-toplevel
    pytest.skip(f'{dnnl_conv.LIB_PATH} not built (README.md)')


def shape_errors(shape, wany: int) -> tuple[float, float, float]:
  """Relative errors of y, dx and dw for one shape and weight layout."""
  n, h, c, o, k, s, p = shape
  seed = jax.random.PRNGKey(h * 1000 + c + o + k)
  key_x, key_w, key_t = jax.random.split(seed, 3)
  x = jax.random.normal(key_x, (n, h, h, c))
  w = jax.random.normal(key_w, (k, k, c, o)) / np.sqrt(k * k * c)
  out = (h + 2 * p - k) // s + 1
  cotangent = jax.random.normal(key_t, (n, out, out, o))

  def value_and_grads(conv):
    loss = lambda x, w: jnp.sum(conv(x, w, s, p) * cotangent)
    return jax.jit(lambda x, w: (conv(x, w, s, p),
                                 jax.grad(loss, argnums=(0, 1))(x, w)))

  y_ref, (dx_ref, dw_ref) = value_and_grads(dnnl_conv.xla_conv)(x, w)
  ours = lambda x, w, s, p: dnnl_conv.conv(x, w, s, p, wany)
  y, (dx, dw) = value_and_grads(ours)(x, w)
  assert y.shape == y_ref.shape, (y.shape, y_ref.shape)
  return (relative_error(y, y_ref), relative_error(dx, dx_ref),
          relative_error(dw, dw_ref))


def worst_error(verbose: bool = False) -> float:
  """The largest error over SHAPES and both weight layouts."""
  worst = 0.0
  for wany in (0, 1):
    for shape in SHAPES:
      errors = shape_errors(shape, wany)
      worst = max(worst, *errors)
      if verbose:
        print(f'wany={wany} N,H,Cin,Cout,k,s,p={shape}: y {errors[0]:.1e} '
              f'dx {errors[1]:.1e} dw {errors[2]:.1e}')
  return worst


def pmap_error() -> float:
  """Error of the kernel's gradient, pmapped over the host devices."""
  devices = jax.local_device_count()
  x = jax.random.normal(jax.random.PRNGKey(0), (devices, 2, 9, 9, 4))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 6))
  grad = lambda conv: (lambda x, w: jax.grad(
      lambda w: jnp.sum(conv(x, w, 2, 1) ** 2))(w))
  ours = jax.pmap(grad(dnnl_conv.conv), in_axes=(0, None))(x, w)
  reference = jax.vmap(grad(dnnl_conv.xla_conv), in_axes=(0, None))(x, w)
  return relative_error(ours, reference)


def test_outputs_and_gradients_match_xla():
  _require_library()
  assert worst_error() < TOLERANCE


def test_kernel_gradient_under_pmap_matches_xla():
  _require_library()
  assert pmap_error() < TOLERANCE


def test_vmap_is_not_supported():
  """ffi_call is given no vmap_method, so vmap raises."""
  _require_library()
  x = jnp.ones((2, 1, 9, 9, 4))
  w = jnp.ones((3, 3, 4, 6))
  try:
    jax.vmap(lambda x: dnnl_conv.conv(x, w, 2, 1))(x)
  except NotImplementedError:
    return
  raise AssertionError('vmap worked')


def main():
  if not dnnl_conv.AVAILABLE:
    sys.exit(f'{dnnl_conv.LIB_PATH} not built: see README.md')
  print(f'oneDNN {dnnl_conv.VERSION} from {dnnl_conv.LIB_PATH}')
  worst, error = worst_error(verbose=True), pmap_error()
  print(f'worst relative error {worst:.1e}')
  print(f'pmap on {jax.local_device_count()} devices: {error:.1e}')
  assert max(worst, error) < TOLERANCE, (worst, error)
  test_vmap_is_not_supported()
  print('vmap: NotImplementedError, as expected')


if __name__ == '__main__':
  main()
