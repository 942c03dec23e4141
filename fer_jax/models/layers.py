"""Convolution and BatchNorm configured as torchvision's backbones use them."""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def pad_spatial(x: jax.Array, pad: int, value: float = 0.0) -> jax.Array:
  """x [B, H, W, C] with pad values on each side of its rows and columns."""
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)),
                 constant_values=value)


def strided_views(x: jax.Array, k: int, strides: int):
  """The k*k views of x [B, H, W, C] that a k x k window with this stride
  reads (no padding): yields ((i, j), x[:, i + strides*h, j + strides*w])."""
  batch, height, width, channels = x.shape
  out_h, out_w = (height - k) // strides + 1, (width - k) // strides + 1
  for i in range(k):
    for j in range(k):
      yield (i, j), jax.lax.slice(
          x, (0, i, j, 0),
          (batch, i + (out_h - 1) * strides + 1,
           j + (out_w - 1) * strides + 1, channels),
          (1, strides, strides, 1))


def im2col_conv(x: jax.Array, kernel: jax.Array, strides: int,
                pad: int) -> jax.Array:
  """A convolution as one 2-D matmul of the k*k strided views of x."""
  k, channels = kernel.shape[0], x.shape[-1]
  x = pad_spatial(x, pad)
  patches = jnp.concatenate(
      [view for _, view in strided_views(x, k, strides)], axis=-1)
  y = jnp.dot(patches.reshape(-1, k * k * channels),
              kernel.reshape(k * k * channels, -1),
              preferred_element_type=jnp.float32).astype(x.dtype)
  return y.reshape(*patches.shape[:3], -1)


def sum_over_batch_chunks(fn: Callable[[jax.Array, jax.Array], jax.Array],
                          x: jax.Array, dy: jax.Array,
                          chunk_bytes: int = 2**20) -> jax.Array:
  """The sum of fn(x[c], dy[c]) over chunks c of the batch, each about
  chunk_bytes of x, in a lax.scan.

  A kernel gradient reads each tap's view of the activations: over the
  whole batch, that streams them from memory once per tap; a chunk stays
  in cache for all taps (XLA:CPU: 3.8x faster for 5x5 depthwise taps at
  32 x 28 x 28 x 240, 2.2x for a 3x3 convolution at 32 x 28 x 28 x 64).
  """
  batch = x.shape[0]
  image_bytes = x[0].size * x.dtype.itemsize
  chunk = max([c for c in range(1, batch + 1)
               if batch % c == 0 and c * image_bytes <= chunk_bytes] or [1])
  split = lambda a: a.reshape(batch // chunk, chunk, *a.shape[1:])
  total = jax.eval_shape(fn, split(x)[0], split(dy)[0])

  def add_chunk(total, chunk_arrays):
    return total + fn(*chunk_arrays), None

  total, _ = jax.lax.scan(add_chunk, jnp.zeros(total.shape, total.dtype),
                          (split(x), split(dy)))
  return total


def _conv(x: jax.Array, kernel: jax.Array, strides: int,
          pad: int) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, kernel, (strides, strides), ((pad, pad), (pad, pad)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_matmul_grad(x: jax.Array, kernel: jax.Array, strides: int,
                     pad: int) -> jax.Array:
  """lax.conv_general_dilated whose kernel gradient is k*k matmuls.

  XLA:CPU computes a convolution's kernel gradient as another convolution
  (the batch as its contraction, the output as a k x k map), 2-10x slower
  than the forward pass; the sum over taps of view^T @ dy, a few images at
  a time, costs about as much as the forward (docs/performance.md). The forward
  and the input gradient stay XLA's.
  """
  return _conv(x, kernel, strides, pad)


def _conv_forward(x, kernel, strides, pad):
  return _conv(x, kernel, strides, pad), (x, kernel)


def _conv_backward(strides, pad, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: _conv(x, kernel, strides, pad), x)
  dx, = input_vjp(dy)

  def taps(x, dy):
    views = strided_views(pad_spatial(x, pad), kernel.shape[0], strides)
    dy = dy.reshape(-1, dy.shape[-1])
    return jnp.stack([
        jnp.dot(view.reshape(-1, x.shape[-1]).T, dy,
                preferred_element_type=jnp.float32) for _, view in views])

  dkernel = sum_over_batch_chunks(taps, x, dy)
  return dx, dkernel.reshape(kernel.shape).astype(kernel.dtype)


conv_matmul_grad.defvjp(_conv_forward, _conv_backward)


def _pool_views(x: jax.Array, k: int, strides: int, pad: int):
  x = pad_spatial(x, pad, -jnp.inf)
  return x, strided_views(x, k, strides)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, k: int, strides: int, pad: int) -> jax.Array:
  """k x k max pooling (padding never wins), whose gradient goes to each
  window's first maximum in row-major order, as XLA's and PyTorch's do.

  XLA:CPU differentiates reduce_window max as select-and-scatter, expanded
  into four int32 iotas of the padded input, a five-output reduce-window
  and a scatter: about 9% of ResNet18's train step at 72 px. Here the
  gradient is k*k masked, interior-padded copies of dy (docs/performance.md).
  """
  _, views = _pool_views(x, k, strides, pad)
  return functools.reduce(jnp.maximum, (view for _, view in views))


def _pool_forward(x, k, strides, pad):
  y = max_pool(x, k, strides, pad)
  return y, (x, y)


def _pool_backward(k, strides, pad, residuals, dy):
  x, y = residuals
  padded, views = _pool_views(x, k, strides, pad)
  height, width = padded.shape[1:3]
  out_h, out_w = y.shape[1:3]
  zero = jnp.zeros((), dy.dtype)
  taken = jnp.zeros(y.shape, bool)
  dx = jnp.zeros(padded.shape, dy.dtype)
  for (i, j), view in views:
    first = (view == y) & ~taken
    taken = taken | first
    dx = dx + jax.lax.pad(jnp.where(first, dy, zero), zero, (
        (0, 0, 0),
        (i, height - i - (out_h - 1) * strides - 1, strides - 1),
        (j, width - j - (out_w - 1) * strides - 1, strides - 1),
        (0, 0, 0)))
  return (dx[:, pad:height - pad, pad:width - pad],)


max_pool.defvjp(_pool_forward, _pool_backward)


class CpuConv(nn.Module):
  """A bias-free convolution with nn.Conv's parameters, written for XLA:CPU.

  Matmuls accumulate in float32 under bfloat16, as the library's do.

  1x1: one 2-D matmul (3-7x faster forward+backward than XLA:CPU's 1x1
  convolution). kxk, strided or on maps of at most 8x8 pixels: im2col and
  one matmul (1.5-70x faster; XLA:CPU is slowest on maps smaller than the
  kernel). Otherwise lax.conv_general_dilated, with the kernel gradient
  as matmuls (conv_matmul_grad; not for a 3x3 RGB stem, where XLA's
  own was faster).
  docs/performance.md has the measurements.
  """
  features: int
  kernel_size: int
  strides: int = 1
  pad: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, s, channels = self.kernel_size, self.strides, x.shape[-1]
    kernel = self.param('kernel', conv_init, (k, k, channels, self.features))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if k == 1 and self.pad == 0:
      x = x[:, ::s, ::s]
      batch, height, width, _ = x.shape
      y = jnp.dot(x.reshape(-1, channels), kernel[0, 0],
                  preferred_element_type=jnp.float32).astype(x.dtype)
      return y.reshape(batch, height, width, self.features)
    if channels >= 8 and (s > 1 or x.shape[1] * x.shape[2] <= 64):
      return im2col_conv(x, kernel, s, self.pad)
    if channels < 8 and k < 5:
      # EfficientNet's 3x3 RGB stem: XLA's kernel gradient is faster there.
      return _conv(x, kernel, s, self.pad)
    return conv_matmul_grad(x, kernel, s, self.pad)


def torch_style_layers(dtype: Any, train: bool, momentum: float,
                       epsilon: float, axis_name: str | None,
                       kernels: str = 'library'):
  """(conv, norm) constructors: bias-free convolutions and BatchNorm.

  In training, BatchNorm uses the batch's statistics, averaged over the
  pmap axis `axis_name`; in evaluation, its running averages. With
  kernels='cpu', convolutions are CpuConv. Square kernels and strides, and
  symmetric padding, are all the backbones use.
  """
  library_conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype,
                                   kernel_init=conv_init)

  def conv(features, kernel_size, strides=(1, 1), padding='VALID',
           name=None):
    if kernels == 'cpu':
      pad = 0 if padding == 'VALID' else padding[0][0]
      return CpuConv(features, kernel_size[0], strides[0], pad, dtype,
                     name=name)
    return library_conv(features, kernel_size, strides, padding=padding,
                        name=name)

  norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                           momentum=momentum, epsilon=epsilon, dtype=dtype,
                           axis_name=axis_name if train else None)
  return conv, norm


def kernels_impl(name: str) -> str:
  """model.kernels resolved: 'auto' is 'cpu' on the CPU, else 'library'.

  'cpu': depthwise convolutions as shifted sums, 1x1, strided and
  small-map ones as matmuls (CpuConv), and max_pool, which XLA:CPU runs
  fast; 'library': lax.conv_general_dilated and reduce_window, which cuDNN
  and XLA:GPU run fast. Same parameters and results either way.
  """
  if name == 'auto':
    return 'cpu' if jax.default_backend() == 'cpu' else 'library'
  if name not in ('cpu', 'library'):
    raise ValueError(f"model.kernels: {name!r} is not 'auto', 'cpu' or "
                     "'library'")
  return name
