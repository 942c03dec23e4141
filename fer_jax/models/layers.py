"""Convolution and BatchNorm configured as torchvision's backbones use them."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class PointwiseConv(nn.Module):
  """A bias-free 1x1 convolution as one 2-D matmul; nn.Conv's parameters.

  XLA:CPU runs the matmul 3-7x faster than its 1x1 convolution, forward
  and backward (BENCHMARKS.md).
  """
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', conv_init,
                        (1, 1, x.shape[-1], self.features))
    if self.strides > 1:
      x = x[:, ::self.strides, ::self.strides]
    batch, height, width, channels = x.shape
    y = jnp.dot(x.reshape(-1, channels).astype(self.dtype),
                kernel[0, 0].astype(self.dtype))
    return y.reshape(batch, height, width, self.features)


def torch_style_layers(dtype: Any, train: bool, momentum: float,
                       epsilon: float, axis_name: str | None,
                       kernels: str = 'library'):
  """(conv, norm) constructors: bias-free convolutions and BatchNorm.

  In training, BatchNorm uses the batch's statistics, averaged over the
  pmap axis `axis_name`; in evaluation, its running averages. With
  kernels='cpu', 1x1 convolutions are PointwiseConv matmuls.
  """
  library_conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype,
                                   kernel_init=conv_init)

  def conv(features, kernel_size, strides=(1, 1), padding='SAME', name=None):
    if kernels == 'cpu' and tuple(kernel_size) == (1, 1):
      return PointwiseConv(features, strides[0], dtype, name=name)
    return library_conv(features, kernel_size, strides, padding=padding,
                        name=name)

  norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                           momentum=momentum, epsilon=epsilon, dtype=dtype,
                           axis_name=axis_name if train else None)
  return conv, norm


def kernels_impl(name: str) -> str:
  """model.kernels resolved: 'auto' is 'cpu' on the CPU, else 'library'.

  'cpu': depthwise and 1x1 convolutions written as the shifted sums and
  matmuls that XLA:CPU runs fast; 'library': lax.conv_general_dilated,
  which cuDNN runs fast. Same parameters and results either way.
  """
  if name == 'auto':
    return 'cpu' if jax.default_backend() == 'cpu' else 'library'
  if name not in ('cpu', 'library'):
    raise ValueError(f"model.kernels: {name!r} is not 'auto', 'cpu' or "
                     "'library'")
  return name
