"""Losses of the multitask model: cross-entropy and masked valence/arousal MSE.

Losses are built from sums and counts so that a batch split over devices
(or evaluation accumulated over batches) gives exactly the loss of the whole
batch: `loss_sums` per shard, added up, then `normalise`.
"""

import jax
import jax.numpy as jnp
import numpy as np

from fer_jax.labels import NUM_CLASSES


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy [B] with optional label smoothing."""
  targets = jax.nn.one_hot(labels, NUM_CLASSES)
  targets = targets * (1 - label_smoothing) + label_smoothing / NUM_CLASSES
  return -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)


CLASS_WEIGHTS = ('none', 'inverse_frequency', 'max_over_count',
                 'effective_number')


def class_weights(kind: str, class_counts: np.ndarray,
                  beta: float = 0.999) -> np.ndarray | None:
  """Per-class cross-entropy weights [8] from the training class counts.

  'inverse_frequency': N / (8 n_c); the weights average 1 over the
  training examples and every class carries the same total weight.
  'max_over_count': max_c n_c / n_c, 1 for the largest class (as HSEmotion
  weights AffectNet; Savchenko, 2022). 'effective_number': (1 - beta) /
  (1 - beta^n_c), normalised to sum to 8 (Cui et al., 2019); beta -> 0
  gives no weighting, beta -> 1 inverse frequency. An absent class counts
  as one example.
  """
  if kind not in CLASS_WEIGHTS:
    raise ValueError(f'train.class_weights: {kind!r} is not one of '
                     f'{CLASS_WEIGHTS}')
  if kind == 'none':
    return None
  counts = np.maximum(np.asarray(class_counts, np.float64), 1)
  if kind == 'inverse_frequency':
    weights = counts.sum() / (NUM_CLASSES * counts)
  elif kind == 'max_over_count':
    weights = counts.max() / counts
  else:
    if not 0 <= beta < 1:
      raise ValueError(f'train.class_weight_beta: {beta} is not in [0, 1)')
    weights = (1 - beta) / (1 - beta ** counts)
    weights = weights * NUM_CLASSES / weights.sum()
  return weights.astype(np.float32)


def loss_sums(outputs: dict, batch: dict, label_smoothing: float = 0.0,
              weights: np.ndarray | None = None) -> dict:
  """Sums over the valid examples of a batch (shard), and their counts.

  With class weights, each example's cross-entropy is scaled by its class's
  weight; the mean stays over examples (count), not over weights.
  """
  mask = batch['mask'].astype(jnp.float32)
  va_mask = mask * batch['va_mask'].astype(jnp.float32)
  ce = cross_entropy(outputs['logits'], batch['label'], label_smoothing)
  if weights is not None:
    ce = ce * jnp.asarray(weights)[batch['label']]
  va_se = jnp.sum((outputs['va'] - batch['va']) ** 2, axis=-1)
  correct = jnp.argmax(outputs['logits'], -1) == batch['label']
  return {'ce': jnp.sum(ce * mask), 'va_se': jnp.sum(va_se * va_mask),
          'correct': jnp.sum(correct * mask), 'count': jnp.sum(mask),
          'va_count': jnp.sum(va_mask)}


def normalise(sums: dict, va_loss_weight: float) -> dict:
  """Mean losses and accuracy from sums; a batch with no VA gives VA loss 0."""
  count = jnp.maximum(sums['count'], 1.0)
  ce_loss = sums['ce'] / count
  # Each valid example contributes two squared errors, valence and arousal.
  va_loss = sums['va_se'] / (2.0 * jnp.maximum(sums['va_count'], 1.0))
  return {'loss': ce_loss + va_loss_weight * va_loss, 'ce_loss': ce_loss,
          'va_loss': va_loss, 'accuracy': sums['correct'] / count}
