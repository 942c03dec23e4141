"""ResNet18 backbone with torchvision's topology, in NHWC."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fer_jax.models.layers import (kernels_impl, max_pool,
                                   torch_style_layers)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""
  features: int
  strides: int
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.features, (3, 3), (self.strides, self.strides),
                  padding=((1, 1), (1, 1)), name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.features, (3, 3), padding=((1, 1), (1, 1)),
                  name='conv2')(y)
    y = self.norm(name='bn2')(y)
    if residual.shape != y.shape:
      residual = self.conv(self.features, (1, 1),
                           (self.strides, self.strides), padding='VALID',
                           name='downsample_conv')(residual)
      residual = self.norm(name='downsample_bn')(residual)
    return nn.relu(y + residual)


class ResNet18(nn.Module):
  """ResNet18 without its classifier: returns pooled features [B, 512]."""
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9  # torchvision's momentum 0.1, in flax's convention.
  bn_epsilon: float = 1e-5
  axis_name: str | None = None  # pmap axis for cross-replica statistics.
  kernels: str = 'auto'  # 'auto' | 'cpu' | 'library'; see kernels_impl

  @nn.compact
  def __call__(self, x, train: bool = False):
    kernels = kernels_impl(self.kernels)
    conv, norm = torch_style_layers(self.dtype, train, self.bn_momentum,
                                    self.bn_epsilon, self.axis_name, kernels)
    x = conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name='conv1')(x)
    x = nn.relu(norm(name='bn1')(x))
    if kernels == 'cpu':
      x = max_pool(x, 3, 2, 1)
    else:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, features in enumerate((64, 128, 256, 512)):
      for block in range(2):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(features, strides, conv, norm,
                       name=f'layer{stage + 1}_{block}')(x)
    return jnp.mean(x, axis=(1, 2))
