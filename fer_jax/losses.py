"""Losses of the multitask model: cross-entropy (or FERPlus's multi-target
loss) and masked valence/arousal.

Losses are built from sums and counts so that a batch split over devices
(or evaluation accumulated over batches) gives exactly the loss of the whole
batch: `loss_sums` per shard, added up, then `normalise`. The CCC loss is
too: it needs only the sums of p, g, p^2, g^2 and p*g per dimension.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy [B] with optional label smoothing.

  labels: int [B] (positions among the K logits) or target distributions
  [B, K] (FERPlus's kept votes).
  """
  targets = _targets(logits, labels)
  targets = targets * (1 - label_smoothing) + label_smoothing / logits.shape[-1]
  return -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)


def _targets(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """labels as targets [B, K]: one-hot if they are positions."""
  return (labels if labels.ndim == logits.ndim else
          jax.nn.one_hot(labels, logits.shape[-1]))


# FERPlus's multi_target targets are 1 on the kept classes and this
# elsewhere (its src/ferplus.py), so that no product t * p is exactly 0.
MULTI_TARGET_EPSILON = 1e-3


def multi_target_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """FERPlus's multi-target loss [B]: -log max_c t_c p_c, p = softmax.

  labels as for cross_entropy; t is 1 where they are positive and
  MULTI_TARGET_EPSILON elsewhere, so the loss rewards the most probable
  of the kept classes, whichever it is. Computed from log-probabilities:
  max_c (log t_c + log p_c) never takes the log of an underflowed p.
  """
  log_t = jnp.where(_targets(logits, labels) > 0, 0.0,
                    jnp.log(MULTI_TARGET_EPSILON))
  return -jnp.max(log_t + jax.nn.log_softmax(logits), axis=-1)


def is_multi_target(data: ml_collections.ConfigDict) -> bool:
  """Whether a run's expression loss is multi_target_loss (FERPlus's
  data.ferplus_labels='multi_target'), else cross-entropy."""
  return (data.get('layout') == 'ferplus' and
          data.get('ferplus_labels') == 'multi_target')


CLASS_WEIGHTS = ('none', 'inverse_frequency', 'effective_number')


def class_weights(kind: str, class_counts: np.ndarray,
                  beta: float = 0.999) -> np.ndarray | None:
  """Per-class cross-entropy weights [K] from the training class counts n_c.

  'inverse_frequency': proportional to 1 / n_c, every class carrying the
  same total weight (HSEmotion's max n / n_c, Savchenko 2022, up to its
  scale). 'effective_number': proportional to (1 - beta) / (1 - beta^n_c)
  (Cui et al., 2019); beta -> 0 gives no weighting, beta -> 1 inverse
  frequency. Both are scaled so that sum_c n_c w_c = N: the mean weight over
  the training examples is 1, so weighting moves the balance between the
  classes and not the expression loss against valence/arousal. An absent
  class is weighed as if it had one example.
  """
  if kind not in CLASS_WEIGHTS:
    raise ValueError(f'train.class_weights: {kind!r} is not one of '
                     f'{CLASS_WEIGHTS}')
  if kind == 'none':
    return None
  counts = np.asarray(class_counts, np.float64)
  present = np.maximum(counts, 1)
  if kind == 'inverse_frequency':
    weights = 1 / present
  else:
    if not 0 <= beta < 1:
      raise ValueError(f'train.class_weight_beta: {beta} is not in [0, 1)')
    weights = (1 - beta) / (1 - beta ** present)
  weights = weights * counts.sum() / (counts * weights).sum()
  return weights.astype(np.float32)


def configured_class_weights(train: ml_collections.ConfigDict,
                             class_counts: np.ndarray) -> np.ndarray | None:
  """class_weights as train.class_weights and class_weight_beta ask.

  Configs saved before class_weight_beta existed get its default.
  """
  return class_weights(train.class_weights, class_counts,
                       train.get('class_weight_beta', 0.999))


def loss_sums(outputs: dict, batch: dict, label_smoothing: float = 0.0,
              weights: np.ndarray | None = None,
              multi_target: bool = False) -> dict:
  """Sums over the valid examples of a batch (shard), and their counts.

  The expression loss ('ce') is cross-entropy, or multi_target_loss when
  multi_target. With class weights, each example's loss is scaled by its
  class's (its label's) weight; the mean stays over examples (count), not
  over weights.
  """
  mask = batch['mask'].astype(jnp.float32)
  va_mask = mask * batch['va_mask'].astype(jnp.float32)
  # FERPlus's targets, where the batch has them (data.ferplus_labels other
  # than 'majority', in training); else the labels.
  targets = batch.get('soft', batch['label'])
  ce = (multi_target_loss(outputs['logits'], targets) if multi_target else
        cross_entropy(outputs['logits'], targets, label_smoothing))
  if weights is not None:
    ce = ce * jnp.asarray(weights)[batch['label']]
  pred, true = outputs['va'], batch['va']
  va_se = jnp.sum((pred - true) ** 2, axis=-1)
  correct = jnp.argmax(outputs['logits'], -1) == batch['label']
  weight = va_mask[:, None]
  return {'ce': jnp.sum(ce * mask), 'va_se': jnp.sum(va_se * va_mask),
          'correct': jnp.sum(correct * mask), 'count': jnp.sum(mask),
          'va_count': jnp.sum(va_mask),
          # Per dimension [2], over the VA-valid examples, for the CCC.
          'va_p': jnp.sum(pred * weight, 0), 'va_g': jnp.sum(true * weight, 0),
          'va_pp': jnp.sum(pred ** 2 * weight, 0),
          'va_gg': jnp.sum(true ** 2 * weight, 0),
          'va_pg': jnp.sum(pred * true * weight, 0)}


def ccc_from_sums(sums: dict) -> jax.Array:
  """CCC [2] of valence and arousal over the examples the sums cover.

  Population moments, as metrics.ccc; 0 with fewer than two examples.
  """
  n = jnp.maximum(sums['va_count'], 1.0)
  mean_p, mean_g = sums['va_p'] / n, sums['va_g'] / n
  var_p = sums['va_pp'] / n - mean_p ** 2
  var_g = sums['va_gg'] / n - mean_g ** 2
  covariance = sums['va_pg'] / n - mean_p * mean_g
  denominator = jnp.maximum(var_p + var_g + (mean_p - mean_g) ** 2, 1e-8)
  return jnp.where(sums['va_count'] >= 2, 2 * covariance / denominator, 0.0)


VA_LOSSES = ('mse', 'ccc', 'mse+ccc')


def normalise(sums: dict, va_loss_weight: float,
              va_loss: str = 'mse') -> dict:
  """Mean losses and accuracy from sums; a batch with no VA gives VA loss 0.

  va_loss: 'mse' (over both dimensions), 'ccc' (1 - CCC, the mean of the
  two dimensions, over the batch), or 'mse+ccc' (their sum). The total is
  CE + va_loss_weight x that.
  """
  if va_loss not in VA_LOSSES:
    raise ValueError(f'train.va_loss: {va_loss!r} is not one of {VA_LOSSES}')
  count = jnp.maximum(sums['count'], 1.0)
  ce_loss = sums['ce'] / count
  # Each valid example contributes two squared errors, valence and arousal.
  va_mse = sums['va_se'] / (2.0 * jnp.maximum(sums['va_count'], 1.0))
  ccc = ccc_from_sums(sums)
  va_ccc_loss = jnp.where(sums['va_count'] >= 2, 1.0 - ccc.mean(), 0.0)
  va = {'mse': va_mse, 'ccc': va_ccc_loss,
        'mse+ccc': va_mse + va_ccc_loss}[va_loss]
  return {'loss': ce_loss + va_loss_weight * va, 'ce_loss': ce_loss,
          'va_loss': va, 'va_mse': va_mse, 'va_ccc_loss': va_ccc_loss,
          'accuracy': sums['correct'] / count}
