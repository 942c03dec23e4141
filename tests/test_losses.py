"""Losses against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fer_jax import losses


def reference_loss(logits, labels, va_pred, va_true, mask, va_mask,
                   smoothing, va_weight):
  """The multitask loss written out in float64 NumPy."""
  logits = logits.astype(np.float64)
  log_p = logits - logits.max(1, keepdims=True)
  log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
  target = np.full(logits.shape, smoothing / 8)
  target[np.arange(len(labels)), labels] += 1 - smoothing
  ce = -(target * log_p).sum(1)
  ce_loss = ce[mask].mean() if mask.any() else 0.0
  valid = mask & va_mask
  va_loss = (((va_pred - va_true) ** 2)[valid].mean()
             if valid.any() else 0.0)
  return ce_loss + va_weight * va_loss, ce_loss, va_loss


def random_batch(rng, n, mask_rate=0.2, va_mask_rate=0.3):
  return dict(
      logits=rng.normal(0, 3, (n, 8)).astype(np.float32),
      label=rng.integers(0, 8, n).astype(np.int32),
      va_pred=rng.uniform(-1, 1, (n, 2)).astype(np.float32),
      va=rng.uniform(-1, 1, (n, 2)).astype(np.float32),
      mask=rng.random(n) > mask_rate,
      va_mask=rng.random(n) > va_mask_rate)


def jax_loss(b, smoothing, va_weight):
  outputs = {'logits': jnp.asarray(b['logits']), 'va': jnp.asarray(b['va_pred'])}
  batch = {k: jnp.asarray(b[k]) for k in ('label', 'va', 'mask', 'va_mask')}
  return losses.normalise(losses.loss_sums(outputs, batch, smoothing),
                          va_weight)


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_multitask_loss_matches_float64_reference(seed, smoothing):
  b = random_batch(np.random.default_rng(seed), 37)
  got = jax_loss(b, smoothing, va_weight=0.7)
  want = reference_loss(b['logits'], b['label'], b['va_pred'], b['va'],
                        b['mask'], b['va_mask'], smoothing, 0.7)
  np.testing.assert_allclose([got['loss'], got['ce_loss'], got['va_loss']],
                             want, rtol=1e-5)


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
@pytest.mark.parametrize('k', [7, 8])
def test_cross_entropy_over_k_classes_with_labels_or_vote_distributions(
    k, smoothing):
  """K logits (the run's label space); targets as labels, or as FERPlus's
  vote distributions, against float64."""
  rng = np.random.default_rng(k)
  n = 23
  logits = rng.normal(0, 3, (n, k)).astype(np.float32)
  votes = rng.integers(0, 6, (n, k)) * (rng.random((n, k)) < 0.4)
  votes[:, 0] += 1
  soft = (votes / votes.sum(1, keepdims=True)).astype(np.float32)
  mask = rng.random(n) > 0.2
  batch = {'label': jnp.asarray(soft.argmax(1).astype(np.int32)),
           'va': jnp.zeros((n, 2)), 'mask': jnp.asarray(mask),
           'va_mask': jnp.zeros(n, bool)}
  outputs = {'logits': jnp.asarray(logits), 'va': jnp.zeros((n, 2))}
  log_p = logits.astype(np.float64)
  log_p = log_p - log_p.max(1, keepdims=True)
  log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
  for targets in (np.eye(k)[soft.argmax(1)], soft):
    if targets is soft:
      batch['soft'] = jnp.asarray(soft)
    got = losses.normalise(losses.loss_sums(outputs, batch, smoothing), 1.0)
    want = -((targets * (1 - smoothing) + smoothing / k) * log_p).sum(1)
    assert float(got['ce_loss']) == pytest.approx(want[mask].mean(),
                                                  rel=1e-5)


def reference_multi_target(logits: np.ndarray, kept: np.ndarray) -> np.ndarray:
  """FERPlus's multi-target loss in float64: -log max(t * p), t 1 on the
  kept classes and 0.001 elsewhere, as its src/ferplus.py and train.py."""
  t = (1 - 0.001) * (kept > 0) + 0.001
  logits = logits.astype(np.float64)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p = p / p.sum(1, keepdims=True)
  return -np.log(np.max(t * p, axis=1))


@pytest.mark.parametrize('scale', [1.0, 40.0])
def test_multi_target_loss_matches_float64_reference(scale):
  """Kept sets of one to three classes as distributions (FERPlus's kept
  votes) or labels; at scale 40 the kept classes' probabilities underflow
  in float32 and the loss is the floor's, still finite."""
  rng = np.random.default_rng(int(scale))
  n, k = 64, 8
  logits = (rng.normal(0, 1, (n, k)) * scale).astype(np.float32)
  kept = np.zeros((n, k))
  for row, size in zip(kept, rng.integers(1, 4, n)):
    row[rng.choice(k, size, replace=False)] = rng.integers(2, 6, size)
  soft = (kept / kept.sum(1, keepdims=True)).astype(np.float32)
  got = losses.multi_target_loss(jnp.asarray(logits), jnp.asarray(soft))
  want = reference_multi_target(logits, kept)
  if scale > 1:  # some rows' kept classes all have probability 0 in float32
    p32 = np.asarray(jax.nn.softmax(jnp.asarray(logits)))
    assert (np.where(kept > 0, p32, 0).max(1) == 0).any()
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  labels = soft.argmax(1)
  np.testing.assert_allclose(
      losses.multi_target_loss(jnp.asarray(logits), jnp.asarray(labels)),
      reference_multi_target(logits, np.eye(k)[labels]), rtol=1e-5,
      atol=1e-5)
  # loss_sums takes it for the expression loss when asked.
  mask = rng.random(n) > 0.2
  batch = {'label': jnp.asarray(labels.astype(np.int32)),
           'soft': jnp.asarray(soft), 'va': jnp.zeros((n, 2)),
           'mask': jnp.asarray(mask), 'va_mask': jnp.zeros(n, bool)}
  sums = losses.loss_sums({'logits': jnp.asarray(logits),
                           'va': jnp.zeros((n, 2))}, batch,
                          multi_target=True)
  assert float(losses.normalise(sums, 1.0)['ce_loss']) == pytest.approx(
      want[mask].mean(), rel=1e-5)


def test_all_masked_va_gives_zero_va_loss_not_nan():
  b = random_batch(np.random.default_rng(3), 16, va_mask_rate=1.1)
  got = jax_loss(b, 0.0, va_weight=1.0)
  assert float(got['va_loss']) == 0.0
  assert np.isfinite(float(got['loss']))
  np.testing.assert_allclose(
      got['loss'], reference_loss(b['logits'], b['label'], b['va_pred'],
                                  b['va'], b['mask'], b['va_mask'], 0.0,
                                  1.0)[0], rtol=1e-5)


def test_sums_over_shards_equal_the_whole_batch():
  b = random_batch(np.random.default_rng(4), 40)
  outputs = lambda s: {'logits': b['logits'][s], 'va': b['va_pred'][s]}
  batch = lambda s: {k: b[k][s] for k in ('label', 'va', 'mask', 'va_mask')}
  parts = [losses.loss_sums(outputs(s), batch(s))
           for s in (slice(0, 13), slice(13, 40))]
  summed = {k: parts[0][k] + parts[1][k] for k in parts[0]}
  whole = losses.loss_sums(outputs(slice(None)), batch(slice(None)))
  for k in whole:
    np.testing.assert_allclose(summed[k], whole[k], rtol=1e-5)


def test_accuracy_counts_only_valid_examples():
  logits = np.eye(8, dtype=np.float32)[[0, 1, 2, 3]]
  labels = np.array([0, 1, 5, 5], np.int32)
  got = losses.normalise(losses.loss_sums(
      {'logits': logits, 'va': np.zeros((4, 2), np.float32)},
      {'label': labels, 'va': np.zeros((4, 2), np.float32),
       'mask': np.array([True, True, True, False]),
       'va_mask': np.ones(4, bool)}), 1.0)
  assert float(got['accuracy']) == pytest.approx(2 / 3)


AFFECTNET_COUNTS = np.array([74874, 134415, 25459, 14090, 6378, 3803, 24882,
                             3750])  # training set, Mollahosseini et al.


SKEWED = np.array([300, 4700, 90, 50, 20, 13, 90, 0])  # Contempt absent


@pytest.mark.parametrize('counts', [AFFECTNET_COUNTS, SKEWED])
def test_class_weights_follow_their_formulas_with_mean_one_per_example(
    counts):
  """In float64: proportional to 1 / n_c and to the effective number's
  inverse, scaled so that sum_c n_c w_c = N."""
  n = counts.astype(np.float64)
  present = np.maximum(n, 1)  # an absent class weighs as one example
  beta = 0.9999
  for kind, shape in (('inverse_frequency', 1 / present),
                      ('effective_number',
                       (1 - beta) / (1 - beta ** present))):
    w = losses.class_weights(kind, counts, beta).astype(np.float64)
    assert np.sum(n * w) == pytest.approx(n.sum(), rel=1e-6)
    np.testing.assert_allclose(w / w[0], shape / shape[0], rtol=1e-5)
  assert losses.class_weights('none', counts) is None


def test_class_weights_leave_the_mean_loss_of_equal_losses_alone():
  """A batch in the training proportions with the same cross-entropy for
  every example: weighting does not change its mean, only who carries it."""
  labels = np.repeat(np.arange(8), SKEWED)
  logits = np.zeros((len(labels), 8), np.float32)
  batch = {'label': labels, 'mask': np.ones(len(labels), bool),
           'va': np.zeros((len(labels), 2), np.float32),
           'va_mask': np.ones(len(labels), bool)}
  outputs = {'logits': logits, 'va': np.zeros((len(labels), 2), np.float32)}
  plain = losses.loss_sums(outputs, batch)
  for kind in ('inverse_frequency', 'effective_number'):
    weighted = losses.loss_sums(outputs, batch, weights=losses.class_weights(
        kind, SKEWED, 0.99))
    assert float(weighted['ce']) == pytest.approx(float(plain['ce']),
                                                  rel=1e-5)


def test_effective_number_spans_no_weighting_to_inverse_frequency():
  n = AFFECTNET_COUNTS
  np.testing.assert_allclose(losses.class_weights('effective_number', n, 0.0),
                             np.ones(8), rtol=1e-6)
  np.testing.assert_allclose(
      losses.class_weights('effective_number', n, 1 - 1e-9),
      losses.class_weights('inverse_frequency', n), rtol=1e-3)


def test_class_weights_survive_an_absent_class_and_name_bad_settings():
  for kind in ('inverse_frequency', 'effective_number'):
    assert np.all(np.isfinite(losses.class_weights(kind, SKEWED)))
  with pytest.raises(ValueError, match="train.class_weights: 'sqrt'"):
    losses.class_weights('sqrt', SKEWED)
  with pytest.raises(ValueError, match='train.class_weight_beta: 1.0'):
    losses.class_weights('effective_number', SKEWED, 1.0)


def test_flip_average_keeps_an_underflowing_probability_finite():
  """Class 7 at -120 in both views: its probability, about 1e-52, is 0 in
  float32, whose log would be -inf and the smoothed cross-entropy NaN."""
  from fer_jax import steps
  logits = np.array([[3.0, 0, 0, 0, 0, 0, 0, -120],
                     [0.5, 2, 0, 0, 1, 0, 0, -125]], np.float32)
  mirrored = np.array([[1.0, 0, 2, 0, 0, 0, 0, -121],
                       [0.0, 1, 0, 3, 1, 0, 0, -119]], np.float32)
  va = np.zeros((2, 2), np.float32)
  out = steps.flip_average({'logits': logits, 'va': va},
                           {'logits': mirrored, 'va': va + 0.5})
  from scipy.special import log_softmax
  want = np.log((np.exp(log_softmax(np.float64(logits), axis=-1)) +
                 np.exp(log_softmax(np.float64(mirrored), axis=-1))) / 2)
  np.testing.assert_allclose(out['logits'], want, rtol=1e-6)
  np.testing.assert_allclose(out['va'], 0.25)
  batch = {'label': np.array([7, 0]), 'mask': np.ones(2, bool), 'va': va,
           'va_mask': np.ones(2, bool)}
  ce = float(losses.loss_sums(out, batch, label_smoothing=0.1)['ce'])
  targets = np.full((2, 8), 0.1 / 8) + 0.9 * np.eye(8)[[7, 0]]
  assert ce == pytest.approx(-np.sum(targets * want), rel=1e-6)


def reference_ccc_loss(va_pred, va_true, valid):
  """1 - CCC per dimension (population moments), averaged, in float64."""
  if valid.sum() < 2:
    return 0.0
  p, g = va_pred[valid].astype(np.float64), va_true[valid].astype(np.float64)
  cov = ((p - p.mean(0)) * (g - g.mean(0))).mean(0)
  ccc = 2 * cov / (p.var(0) + g.var(0) + (p.mean(0) - g.mean(0)) ** 2)
  return float(np.mean(1 - ccc))


def va_loss(b, kind, weight=0.5):
  outputs = {'logits': jnp.asarray(b['logits']), 'va': jnp.asarray(b['va_pred'])}
  batch = {k: jnp.asarray(b[k]) for k in ('label', 'va', 'mask', 'va_mask')}
  return losses.normalise(losses.loss_sums(outputs, batch), weight, kind)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_ccc_losses_match_float64_reference(seed):
  b = random_batch(np.random.default_rng(seed), 41)
  b['va_pred'] = (0.6 * b['va'] + np.random.default_rng(seed + 9).normal(
      0, 0.3, b['va'].shape)).astype(np.float32)
  valid = b['mask'] & b['va_mask']
  _, ce, mse = reference_loss(b['logits'], b['label'], b['va_pred'], b['va'],
                              b['mask'], b['va_mask'], 0.0, 1.0)
  ccc = reference_ccc_loss(b['va_pred'], b['va'], valid)
  for kind, want in (('mse', mse), ('ccc', ccc), ('mse+ccc', mse + ccc)):
    got = va_loss(b, kind)
    np.testing.assert_allclose([got['va_loss'], got['loss']],
                               [want, ce + 0.5 * want], rtol=2e-5)
  assert 0.1 < ccc < 1.0  # a real signal, not a degenerate case


@pytest.mark.parametrize('kind', ['ccc', 'mse+ccc'])
def test_ccc_loss_of_an_all_masked_batch_is_zero_with_finite_gradients(kind):
  b = random_batch(np.random.default_rng(5), 16, va_mask_rate=1.1)
  batch = {k: jnp.asarray(b[k]) for k in ('label', 'va', 'mask', 'va_mask')}

  def loss(va_pred):
    outputs = {'logits': jnp.asarray(b['logits']), 'va': va_pred}
    return losses.normalise(losses.loss_sums(outputs, batch), 1.0,
                            kind)['va_loss']
  value, grad = jax.value_and_grad(loss)(jnp.asarray(b['va_pred']))
  assert float(value) == 0.0
  assert np.all(np.isfinite(grad)) and not np.any(grad)
  with pytest.raises(ValueError, match="train.va_loss: 'l1'"):
    va_loss(b, 'l1')
