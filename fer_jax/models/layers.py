"""Convolution and BatchNorm configured as torchvision's backbones use them."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def torch_style_layers(dtype: Any, train: bool, momentum: float,
                       epsilon: float, axis_name: str | None):
  """(conv, norm) constructors: bias-free convolutions and BatchNorm.

  In training, BatchNorm uses the batch's statistics, averaged over the
  pmap axis `axis_name`; in evaluation, its running averages.
  """
  conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype,
                           kernel_init=conv_init)
  norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                           momentum=momentum, epsilon=epsilon, dtype=dtype,
                           axis_name=axis_name if train else None)
  return conv, norm


def kernels_impl(name: str) -> str:
  """model.kernels resolved: 'auto' is 'shifted' on CPU, else 'library'."""
  if name == 'auto':
    return 'shifted' if jax.default_backend() == 'cpu' else 'library'
  if name not in ('shifted', 'library'):
    raise ValueError(f"model.kernels: {name!r} is not 'auto', 'shifted' or "
                     "'library'")
  return name
