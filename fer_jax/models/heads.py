"""The multitask head and the model that joins it to a backbone."""

import flax.linen as nn
import jax.numpy as jnp

from fer_jax.labels import NUM_CLASSES


class MultitaskHead(nn.Module):
  """Expression logits [B, K] and valence/arousal [B, 2] from features.

  Always float32: under a bfloat16 backbone, bfloat16 logits and
  valence/arousal would be quantised (steps of 1/256 near +-1) before any
  cast, at a cost of a few small matrix products.
  """
  dropout_rate: float = 0.0
  hidden_size: int = 0  # 0: the reference study's head, two Dense layers.
  va_activation: str = 'tanh'  # 'tanh' | 'none'
  num_classes: int = NUM_CLASSES  # K, the run's label space

  @nn.compact
  def __call__(self, features, train: bool = False):
    x = features.astype(jnp.float32)
    if self.hidden_size:
      x = nn.relu(nn.Dense(self.hidden_size, dtype=jnp.float32,
                           name='hidden')(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, dtype=jnp.float32,
                      name='expression')(x)
    va = nn.Dense(2, dtype=jnp.float32, name='va')(x)
    if self.va_activation == 'tanh':
      va = jnp.tanh(va)
    elif self.va_activation != 'none':
      raise ValueError(f"model.va_activation: {self.va_activation!r} is not "
                       "'tanh' or 'none'")
    return {'logits': logits, 'va': va}


class FERModel(nn.Module):
  """A backbone and the multitask head; images are normalised floats NHWC."""
  backbone: nn.Module
  head: MultitaskHead

  def __call__(self, images, train: bool = False):
    features = self.backbone(images, train=train)
    return {**self.head(features, train=train),
            'features': features.astype(jnp.float32)}
