"""A plain three-layer CNN for smoke runs: not a baseline.

The run's lifecycle (records, checkpoints, resumes, several processes,
ablations) does not depend on the backbone, and this one traces, compiles
and steps in a fraction of ResNet18's time: the test suite's tiny runs
and a quick check of a new data set use it (model.name='tiny_cnn').
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fer_jax.models.layers import kernels_impl, torch_style_layers

WIDTHS = (16, 32, 64)


class TinyCNN(nn.Module):
  """Three 3x3 stride-2 convolutions with BatchNorm and ReLU, then global
  average pooling: features [B, 64]."""
  dtype: Any = jnp.float32
  axis_name: str | None = None  # pmap axis for cross-replica statistics.
  kernels: str = 'auto'  # 'auto' | 'cpu' | 'library'; see kernels_impl

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm = torch_style_layers(self.dtype, train, 0.9, 1e-5,
                                    self.axis_name, kernels_impl(self.kernels))
    for i, features in enumerate(WIDTHS):
      x = conv(features, (3, 3), (2, 2), padding=((1, 1), (1, 1)),
               name=f'conv{i + 1}')(x)
      x = nn.relu(norm(name=f'bn{i + 1}')(x))
    return jnp.mean(x, axis=(1, 2))
