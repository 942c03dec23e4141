"""EfficientNet-B0 backbone with torchvision's topology, in NHWC."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fer_jax.models.layers import conv_init, torch_style_layers

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

  @nn.compact
  def __call__(self, x, train: bool = False):
    inputs = x
    channels = x.shape[-1] * self.expand_ratio
    if self.expand_ratio != 1:
      x = nn.silu(self.norm(name='expand_bn')(
          self.conv(channels, (1, 1), name='expand_conv')(x)))
    pad = (self.kernel - 1) // 2
    x = self.conv(channels, (self.kernel, self.kernel),
                  (self.strides, self.strides), padding=((pad, pad),) * 2,
                  feature_group_count=channels, name='dw_conv')(x)
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

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm = torch_style_layers(self.dtype, train, self.bn_momentum,
                                    self.bn_epsilon, self.axis_name)
    x = conv(STEM_CHANNELS, (3, 3), (2, 2), padding=((1, 1), (1, 1)),
             name='stem_conv')(x)
    x = nn.silu(norm(name='stem_bn')(x))
    total = sum(stage[-1] for stage in STAGES)
    index = 0
    for s, (expand, kernel, stride, features, blocks) in enumerate(STAGES):
      for b in range(blocks):
        x = MBConv(expand, kernel, stride if b == 0 else 1, features,
                   self.stochastic_depth_rate * index / total, conv, norm,
                   self.dtype, name=f'stage{s + 1}_{b}')(x, train)
        index += 1
    x = nn.silu(norm(name='head_bn')(
        conv(HEAD_CHANNELS, (1, 1), name='head_conv')(x)))
    return jnp.mean(x, axis=(1, 2))
