"""EfficientNet-B0 backbone with torchvision's topology, in NHWC; and the
variant ported from TensorFlow (timm's tf_efficientnet_b0) that HSEmotion's
published models use."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fer_jax.models.layers import (conv_init, kernels_impl, pad_spatial,
                                    strided_views, sum_over_batch_chunks,
                                    torch_style_layers)

# torchvision's MBConv stages of B0: (expand ratio, kernel, stride,
# output channels, blocks); the input of stage 1 is the 32-channel stem.
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2),
          (6, 3, 2, 80, 3), (6, 5, 1, 112, 3), (6, 5, 2, 192, 4),
          (6, 3, 1, 320, 1))
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def stochastic_depth(x: jax.Array, rate: float, deterministic: bool,
                     rng: jax.Array | None) -> jax.Array:
  """Drops whole examples' residual branches with probability rate ('row')."""
  if deterministic or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0], 1, 1, 1))
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _shifted_sum(x: jax.Array, kernel: jax.Array, strides: int) -> jax.Array:
  """sum_ij x[:, h*s + i, w*s + j] * kernel[i, j, 0] over the k x k taps.

  Accumulated in float32, as the library's convolutions accumulate: in
  bfloat16, 9 or 25 rounded additions moved EfficientNet-B0's loss by 3%.
  """
  f32 = lambda a: a.astype(jnp.float32)
  return sum(f32(view) * f32(kernel[i, j, 0]) for (i, j), view in
             strided_views(x, kernel.shape[0], strides)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_shifted(x: jax.Array, kernel: jax.Array, strides: int,
                      pad: int) -> jax.Array:
  """Depthwise convolution as k*k shifted multiply-adds; kernel [k, k, 1, C].

  Equal to lax.conv_general_dilated with feature_group_count=C. XLA:CPU
  runs it several times faster than its grouped convolution; on a GPU the
  library's is faster (docs/performance.md). The input gradient is the same kind
  of sum over the (dilated) output gradient, one fusion instead of k*k pads.
  """
  return _shifted_sum(pad_spatial(x, pad), kernel, strides)


def _depthwise_forward(x, kernel, strides, pad):
  return depthwise_shifted(x, kernel, strides, pad), (x, kernel)


def _kernel_grad_taps(x: jax.Array, dy: jax.Array, k: int, strides: int,
                      pad: int) -> jax.Array:
  """[k*k, C]: sum over batch and space of each tap's input view times dy.

  Products and sums in float32: bfloat16 products, each rounded, put a
  relative error of 1.6e-3 on the gradient (float32: 8e-8).
  """
  dy = dy.astype(jnp.float32)
  return jnp.stack([
      jnp.sum(view.astype(jnp.float32) * dy, axis=(0, 1, 2))
      for _, view in strided_views(pad_spatial(x, pad), k, strides)])


def _transposed_pads(size: int, out: int, k: int, strides: int,
                     pad: int) -> tuple[int, int, int]:
  """lax.pad's (low, high, interior) of one axis of dy, out long, for the
  input gradient of an axis size long: dy dilated by the stride and padded
  so that each input pixel sees the taps that read it."""
  dilated = (out - 1) * strides + 1
  return k - 1 - pad, size + pad - dilated, strides - 1


def _depthwise_backward(strides, pad, residuals, dy):
  x, kernel = residuals
  k = kernel.shape[0]
  # The transposed convolution: dy dilated and padded (each axis for its
  # own length), the kernel flipped.
  rows, cols = (_transposed_pads(x.shape[a], dy.shape[a], k, strides, pad)
                for a in (1, 2))
  dy_padded = jax.lax.pad(dy, jnp.zeros((), dy.dtype),
                          ((0, 0, 0), rows, cols, (0, 0, 0)))
  dx = _shifted_sum(dy_padded, kernel[::-1, ::-1], 1)
  dkernel = sum_over_batch_chunks(
      lambda x, dy: _kernel_grad_taps(x, dy, k, strides, pad), x, dy)
  dkernel = dkernel.reshape(k, k, 1, -1)
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


depthwise_shifted.defvjp(_depthwise_forward, _depthwise_backward)


def depthwise_library(x: jax.Array, kernel: jax.Array, strides: int,
                      pad: int) -> jax.Array:
  """Depthwise convolution as the library's grouped convolution."""
  return jax.lax.conv_general_dilated(
      x, kernel, (strides, strides), ((pad, pad), (pad, pad)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=x.shape[-1])


DEPTHWISE = {'cpu': depthwise_shifted, 'library': depthwise_library}


def same_pads(size: int, k: int, strides: int) -> tuple[int, int]:
  """TensorFlow's SAME padding (before, after) of one axis: the odd pixel
  goes after, as in timm's Conv2dSame."""
  total = max((-(-size // strides) - 1) * strides + k - size, 0)
  return total // 2, total - total // 2


def pad_same(x: jax.Array, k: int, strides: int) -> jax.Array:
  """x [B, H, W, C] zero-padded for a k x k window as SAME pads it."""
  return jnp.pad(x, ((0, 0), same_pads(x.shape[1], k, strides),
                     same_pads(x.shape[2], k, strides), (0, 0)))


class DepthwiseConv(nn.Module):
  """Bias-free depthwise kxk convolution; its kernel is nn.Conv's [k, k, 1, C]."""
  kernel_size: int
  strides: int
  dtype: Any
  impl: str = 'library'
  same_padding: bool = False  # TensorFlow's SAME, else (k - 1) / 2 each side

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param('kernel', conv_init, (k, k, 1, x.shape[-1]))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.same_padding:
      return DEPTHWISE[self.impl](pad_same(x, k, self.strides), kernel,
                                  self.strides, 0)
    return DEPTHWISE[self.impl](x, kernel, self.strides, (k - 1) // 2)


class SqueezeExcite(nn.Module):
  """Channel gates from the pooled map: reduce, SiLU, expand, sigmoid."""
  squeeze_channels: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, kernel_size=(1, 1), dtype=self.dtype,
                             kernel_init=conv_init)
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.silu(conv(self.squeeze_channels, name='reduce')(s))
    s = nn.sigmoid(conv(x.shape[-1], name='expand')(s))
    return x * s


class MBConv(nn.Module):
  """Inverted residual: 1x1 expand, depthwise kxk, SE, 1x1 project."""
  expand_ratio: int
  kernel: int
  strides: int
  features: int
  drop_rate: float
  conv: Any
  norm: Any
  dtype: Any
  depthwise: str
  same_padding: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    inputs = x
    channels = x.shape[-1] * self.expand_ratio
    if self.expand_ratio != 1:
      x = nn.silu(self.norm(name='expand_bn')(
          self.conv(channels, (1, 1), name='expand_conv')(x)))
    x = DepthwiseConv(self.kernel, self.strides, self.dtype, self.depthwise,
                      self.same_padding, name='dw_conv')(x)
    x = nn.silu(self.norm(name='dw_bn')(x))
    x = SqueezeExcite(max(1, inputs.shape[-1] // 4), self.dtype,
                      name='se')(x)
    x = self.norm(name='project_bn')(
        self.conv(self.features, (1, 1), name='project_conv')(x))
    if self.strides == 1 and inputs.shape[-1] == self.features:
      rng = self.make_rng('dropout') if train and self.drop_rate else None
      x = stochastic_depth(x, self.drop_rate, not train, rng) + inputs
    return x


class EfficientNetB0(nn.Module):
  """EfficientNet-B0 without its classifier: pooled features [B, 1280]."""
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9  # torchvision's BatchNorm2d defaults (0.1, 1e-5)
  bn_epsilon: float = 1e-5
  stochastic_depth_rate: float = 0.2  # of the last block; linear in index
  axis_name: str | None = None
  kernels: str = 'auto'  # 'auto' | 'cpu' | 'library'; see kernels_impl
  # TensorFlow's SAME padding (the stem and strided depthwise convolutions
  # pad the odd pixel after): EfficientNets ported from TensorFlow.
  same_padding: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    depthwise = kernels_impl(self.kernels)
    conv, norm = torch_style_layers(self.dtype, train, self.bn_momentum,
                                    self.bn_epsilon, self.axis_name,
                                    depthwise)
    if self.same_padding:
      x = conv(STEM_CHANNELS, (3, 3), (2, 2), name='stem_conv')(
          pad_same(x, 3, 2))
    else:
      x = conv(STEM_CHANNELS, (3, 3), (2, 2), padding=((1, 1), (1, 1)),
               name='stem_conv')(x)
    x = nn.silu(norm(name='stem_bn')(x))
    total = sum(stage[-1] for stage in STAGES)
    index = 0
    for s, (expand, kernel, stride, features, blocks) in enumerate(STAGES):
      for b in range(blocks):
        x = MBConv(expand, kernel, stride if b == 0 else 1, features,
                   self.stochastic_depth_rate * index / total, conv, norm,
                   self.dtype, depthwise, self.same_padding,
                   name=f'stage{s + 1}_{b}')(x, train)
        index += 1
    x = nn.silu(norm(name='head_bn')(
        conv(HEAD_CHANNELS, (1, 1), name='head_conv')(x)))
    return jnp.mean(x, axis=(1, 2))


class TFEfficientNetB0(EfficientNetB0):
  """EfficientNet-B0 as timm's tf_efficientnet_b0(_ns) ports TensorFlow's:
  SAME padding and BatchNorm epsilon 1e-3; the same variables. HSEmotion's
  published B0 models are this one."""
  bn_epsilon: float = 1e-3
  same_padding: bool = True
