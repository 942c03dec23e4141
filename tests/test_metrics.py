"""NumPy metrics against scikit-learn and float64 formulas."""

import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from sklearn import metrics as skm

from fer_jax import metrics
from fer_jax.labels import EXPRESSIONS


@st.composite
def predictions(draw):
  """A label space (K of the 8 names, in any order) and predictions in it."""
  space = draw(st.permutations(EXPRESSIONS))[:draw(st.integers(2, 8))]
  k = len(space)
  n = draw(st.integers(1, 60))
  present = draw(st.lists(st.integers(0, k - 1), min_size=1, max_size=k,
                          unique=True))
  y_true = draw(st.lists(st.sampled_from(present), min_size=n, max_size=n))
  y_pred = draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
  return tuple(space), np.array(y_true), np.array(y_pred)


@settings(max_examples=150, deadline=None)
@given(predictions())
def test_classification_matches_sklearn_over_the_runs_classes(drawn):
  classes, y_true, y_pred = drawn
  labels = list(range(len(classes)))
  got = metrics.classification_metrics(y_true, y_pred, classes)
  assert got['accuracy'] == pytest.approx(skm.accuracy_score(y_true, y_pred))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # sklearn warns about absent classes
    balanced = skm.balanced_accuracy_score(y_true, y_pred)
  assert got['balanced_accuracy'] == pytest.approx(balanced)
  for average in ('macro', 'weighted'):
    want = skm.f1_score(y_true, y_pred, labels=labels, average=average,
                        zero_division=0)
    assert got[f'{average}_f1'] == pytest.approx(want)
  p, r, f, s = skm.precision_recall_fscore_support(
      y_true, y_pred, labels=labels, zero_division=0)
  assert list(got['per_class']) == list(classes)
  for c, name in enumerate(classes):
    row = got['per_class'][name]
    assert (row['precision'], row['recall'], row['f1'], row['support']) == \
        pytest.approx((p[c], r[c], f[c], s[c]))
  np.testing.assert_array_equal(
      got['confusion_matrix'], skm.confusion_matrix(y_true, y_pred,
                                                    labels=labels))


def test_a_perfect_seven_class_model_scores_one_not_seven_eighths():
  classes = EXPRESSIONS[:7]
  y = np.arange(7).repeat(3)
  got = metrics.classification_metrics(y, y, classes)
  assert got['macro_f1'] == 1.0 and got['balanced_accuracy'] == 1.0
  assert np.shape(got['confusion_matrix']) == (7, 7)
  assert 'Contempt' not in got['per_class']


def reference_ccc(p, g):
  p, g = p.astype(np.float64), g.astype(np.float64)
  cov = np.mean((p - p.mean()) * (g - g.mean()))
  return 2 * cov / (p.var() + g.var() + (p.mean() - g.mean()) ** 2)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10_000), st.integers(3, 200))
def test_regression_matches_sklearn_and_float64(seed, n):
  rng = np.random.default_rng(seed)
  true = rng.uniform(-1, 1, n)
  pred = 0.5 * true + rng.normal(0, 0.5, n)  # some outside [-1, 1]
  got = metrics.regression_metrics(pred, true)
  clipped = np.clip(pred, -1, 1)
  assert got['rmse'] == pytest.approx(
      np.sqrt(skm.mean_squared_error(true, clipped)))
  assert got['mae'] == pytest.approx(skm.mean_absolute_error(true, clipped))
  assert got['pcc'] == pytest.approx(np.corrcoef(clipped, true)[0, 1])
  assert got['ccc'] == pytest.approx(reference_ccc(clipped, true))
  assert got['sagr'] == pytest.approx(
      np.mean(np.sign(clipped) == np.sign(true)))


def test_absent_class_counts_as_zero_f1_in_macro_average():
  y = np.array([0, 0, 1, 1])
  got = metrics.classification_metrics(y, y)
  assert got['macro_f1'] == pytest.approx(2 / 8)
  assert got['per_class']['Contempt'] == {'precision': 0.0, 'recall': 0.0,
                                          'f1': 0.0, 'support': 0}
  assert got['balanced_accuracy'] == 1.0  # over the classes present


def test_constant_prediction_gives_zero_correlation_with_warning():
  true = np.linspace(-1, 1, 10)
  with pytest.warns(UserWarning, match='PCC undefined'):
    got = metrics.regression_metrics(np.full(10, 0.3), true)
  assert got['pcc'] == 0.0
  assert got['ccc'] == pytest.approx(0.0)  # defined: var(true) > 0
  with pytest.warns(UserWarning, match='CCC undefined'):
    assert metrics.ccc(np.full(5, 0.2), np.full(5, 0.2)) == 0.0


def test_compute_metrics_masks_va_and_has_every_report_key():
  rng = np.random.default_rng(0)
  n = 50
  va_true = rng.uniform(-1, 1, (n, 2))
  va_pred = va_true + rng.normal(0, 0.1, (n, 2))
  va_mask = rng.random(n) > 0.3
  va_pred[~va_mask] = 100.0  # masked samples must not count
  got = metrics.compute_metrics(rng.integers(0, 8, n), rng.integers(0, 8, n),
                                va_true, va_pred, va_mask)
  assert got['num_va_examples'] == va_mask.sum()
  want = metrics.regression_metrics(va_pred[va_mask, 1], va_true[va_mask, 1])
  assert got['arousal_rmse'] == pytest.approx(want['rmse'])
  assert got['arousal_rmse'] < 0.2
  expected = {'num_examples', 'num_va_examples', 'accuracy',
              'balanced_accuracy', 'macro_f1', 'weighted_f1', 'per_class',
              'confusion_matrix'} | {
                  f'{d}_{m}' for d in ('valence', 'arousal')
                  for m in ('rmse', 'mae', 'pcc', 'ccc', 'sagr')}
  assert expected <= set(got)


def test_no_va_labels_give_not_available_never_zero():
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # no warning either: nothing is wrong
    got = metrics.compute_metrics(np.zeros(4, int), np.zeros(4, int),
                                  np.zeros((4, 2)), np.zeros((4, 2)),
                                  np.zeros(4, bool))
  assert got['num_va_examples'] == 0
  assert all(got[f'{d}_{m}'] is None for d in ('valence', 'arousal')
             for m in metrics.VA_METRICS)
