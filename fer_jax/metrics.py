"""Evaluation metrics in pure NumPy (no jax, no scikit-learn at run time).

Definitions (docs/api.md, Metrics): macro F1 is the unweighted mean over the
run's K classes (data.classes), a class with no support and no prediction
counting as 0; valence/arousal predictions are clipped to [-1, 1] and
scored on VA-valid samples only, and are None (not available) when a split
has none; CCC uses population variances; SAGR is the rate of matching
signs.
"""

import warnings

import numpy as np

from fer_jax.labels import EXPRESSIONS


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray,
                     num_classes: int = len(EXPRESSIONS)) -> np.ndarray:
  """[K, K] counts, rows the true class, columns the predicted one."""
  index = np.asarray(y_true) * num_classes + np.asarray(y_pred)
  return np.bincount(index, minlength=num_classes ** 2).reshape(
      num_classes, num_classes)


def _divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """a / b with 0 where b is 0 (scikit-learn's zero_division=0)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray,
                           classes: tuple[str, ...] = EXPRESSIONS) -> dict:
  """Accuracy, balanced accuracy, F1s and the per-class table over classes
  (labels are positions in it)."""
  cm = confusion_matrix(y_true, y_pred, len(classes))
  tp = np.diag(cm).astype(np.float64)
  support, predicted = cm.sum(1), cm.sum(0)
  precision, recall = _divide(tp, predicted), _divide(tp, support)
  f1 = _divide(2 * precision * recall, precision + recall)
  present = support > 0
  return {
      'num_examples': int(cm.sum()),
      'accuracy': float(_divide(tp.sum(), cm.sum())),
      'balanced_accuracy': float(recall[present].mean()) if present.any()
                           else 0.0,
      'macro_f1': float(f1.mean()),
      'weighted_f1': float(_divide((f1 * support).sum(), support.sum())),
      'per_class': {name: {'precision': float(precision[c]),
                           'recall': float(recall[c]), 'f1': float(f1[c]),
                           'support': int(support[c])}
                    for c, name in enumerate(classes)},
      'confusion_matrix': cm.tolist(),
  }


def pcc(pred: np.ndarray, true: np.ndarray) -> float:
  """Pearson correlation; 0 (with a warning) when either side is constant."""
  if len(pred) == 0 or np.ptp(pred) == 0 or np.ptp(true) == 0:
    warnings.warn('PCC undefined (empty or constant input); reported as 0')
    return 0.0
  p, g = pred - pred.mean(), true - true.mean()
  return float((p * g).sum() / np.sqrt((p ** 2).sum() * (g ** 2).sum()))


def ccc(pred: np.ndarray, true: np.ndarray) -> float:
  """Concordance correlation coefficient; 0 (with a warning) if undefined."""
  if len(pred) == 0:
    warnings.warn('CCC undefined (no samples); reported as 0')
    return 0.0
  covariance = ((pred - pred.mean()) * (true - true.mean())).mean()
  denominator = pred.var() + true.var() + (pred.mean() - true.mean()) ** 2
  if np.ptp(pred) == 0 and np.ptp(true) == 0 and pred[0] == true[0]:
    warnings.warn('CCC undefined (both sides constant and equal); '
                  'reported as 0')
    return 0.0
  return float(2 * covariance / denominator)


VA_METRICS = ('rmse', 'mae', 'pcc', 'ccc', 'sagr')


def regression_metrics(pred: np.ndarray, true: np.ndarray) -> dict:
  """RMSE, MAE, PCC, CCC and SAGR of one dimension (already masked)."""
  pred = np.clip(np.asarray(pred, np.float64), -1, 1)
  true = np.asarray(true, np.float64)
  if len(pred) == 0:  # not available (None in JSON), never 0
    return dict.fromkeys(VA_METRICS)
  error = pred - true
  return {'rmse': float(np.sqrt((error ** 2).mean())),
          'mae': float(np.abs(error).mean()), 'pcc': pcc(pred, true),
          'ccc': ccc(pred, true),
          'sagr': float((np.sign(pred) == np.sign(true)).mean())}


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray,
                    va_true: np.ndarray, va_pred: np.ndarray,
                    va_mask: np.ndarray,
                    classes: tuple[str, ...] = EXPRESSIONS) -> dict:
  """Every metric of a split's report (docs/api.md, Metrics); y_* are positions
  in classes, the run's label space."""
  metrics = classification_metrics(np.asarray(y_true), np.asarray(y_pred),
                                   tuple(classes))
  va_mask = np.asarray(va_mask, bool)
  metrics['classes'] = list(classes)
  metrics['num_va_examples'] = int(va_mask.sum())
  va_true, va_pred = np.asarray(va_true), np.asarray(va_pred)
  for d, name in enumerate(('valence', 'arousal')):
    scores = regression_metrics(va_pred[va_mask, d], va_true[va_mask, d])
    metrics.update({f'{name}_{k}': v for k, v in scores.items()})
  return metrics


def mean_std(values: list[float]) -> tuple[float, float | None]:
  """Mean and sample standard deviation (None for a single value)."""
  v = np.asarray(values, dtype=np.float64)
  return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)
