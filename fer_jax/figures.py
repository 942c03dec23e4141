"""Figures of a run and of an ablation, as PNG files."""

import io
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

from fer_jax import files  # noqa: E402
from fer_jax.metrics import mean_std  # noqa: E402


def sample_predictions_figure(paths: list[str], images: list[np.ndarray],
                              labels: np.ndarray, probs: np.ndarray,
                              va_true: np.ndarray, va_pred: np.ndarray,
                              classes: tuple[str, ...]):
  """A grid of images titled with the predicted and true expression (of
  classes), the prediction's probability and the predicted (true)
  valence/arousal."""
  columns = min(4, len(images))
  rows = -(-len(images) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns,
                                                   3.2 * rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis('off')
  for ax, path, image, label, p, true, pred in zip(
      axes.ravel(), paths, images, labels, probs, va_true, va_pred):
    guess = int(p.argmax())
    ax.imshow(image)
    ax.set_title(f'{classes[guess]} {p[guess]:.2f}\n'
                 f'true {classes[int(label)]}\n'
                 f'v {pred[0]:+.2f} ({true[0]:+.2f}) '
                 f'a {pred[1]:+.2f} ({true[1]:+.2f})', fontsize=7,
                 color='green' if guess == label else 'red')
  fig.tight_layout()
  return fig


def plot_confusion_matrix(path: Path, cm: np.ndarray, title: str,
                          classes: tuple[str, ...]) -> None:
  """Row-normalised confusion matrix (K x K, classes' order) with counts
  in the cells."""
  cm = np.asarray(cm)
  rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
  fig, ax = plt.subplots(figsize=(7, 6))
  image = ax.imshow(rates, cmap='Blues', vmin=0, vmax=1)
  for i in range(len(cm)):
    for j in range(len(cm)):
      ax.text(j, i, f'{rates[i, j]:.2f}\n({cm[i, j]})', ha='center',
              va='center', fontsize=7,
              color='white' if rates[i, j] > 0.5 else 'black')
  ax.set_xticks(range(len(cm)), classes, rotation=45, ha='right')
  ax.set_yticks(range(len(cm)), classes)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  ax.set_title(title)
  fig.colorbar(image, ax=ax, label='recall (row-normalised)')
  _save(fig, path)


def plot_curves(path: Path, records: list[dict]) -> None:
  """Loss and accuracy (train and val) per epoch, and val macro F1."""
  epochs = [r['epoch'] for r in records]
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for split in ('train', 'val'):
    left.plot(epochs, [r[f'{split}_loss'] for r in records], 'o-',
              label=f'{split} loss')
    right.plot(epochs, [r[f'{split}_accuracy'] for r in records], 'o-',
               label=f'{split} accuracy')
  right.plot(epochs, [r['val_macro_f1'] for r in records], 's--',
             label='val macro F1')
  for ax, name in ((left, 'loss'), (right, 'accuracy / F1')):
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel('epoch')
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend()
  _save(fig, path)


def plot_va_scatter(path: Path, va_true: np.ndarray, va_pred: np.ndarray,
                    labels: np.ndarray, metrics: dict,
                    classes: tuple[str, ...]) -> None:
  """Predicted against true valence and arousal, and the 2-D circumplex
  coloured by the true class (of classes)."""
  va_pred = np.clip(va_pred, -1, 1)
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
  for d, name in enumerate(('valence', 'arousal')):
    ax = axes[d]
    ax.scatter(va_true[:, d], va_pred[:, d], s=4, alpha=0.4)
    ax.plot([-1, 1], [-1, 1], 'k--', lw=1)
    ax.set_title(f"{name}: CCC {metrics[f'{name}_ccc']:.3f}, "
                 f"RMSE {metrics[f'{name}_rmse'] or 0:.3f}")
    ax.set_xlabel(f'true {name}')
    ax.set_ylabel(f'predicted {name}')
  ax = axes[2]
  for c, name in enumerate(classes):
    sel = labels == c
    ax.scatter(va_pred[sel, 0], va_pred[sel, 1], s=4, alpha=0.5, label=name)
  ax.set_title('predicted valence/arousal by true expression')
  ax.set_xlabel('valence')
  ax.set_ylabel('arousal')
  ax.legend(fontsize=7, markerscale=3)
  for ax in axes:
    ax.set_xlim(-1.05, 1.05)
    ax.set_ylim(-1.05, 1.05)
    ax.set_aspect('equal')
    ax.grid(alpha=0.3)
  _save(fig, path)


def _save(fig, path: Path) -> None:
  """The figure as a PNG, written atomically, then closed."""
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=110)
  plt.close(fig)
  files.write_bytes(path, buffer.getvalue())


def plot_ablation(path: Path, variants: list[str], metrics: list[str],
                  values: dict, classes: tuple[str, ...]) -> None:
  """Each metric per variant (seeds as dots, mean ± std as a bar) and the
  per-class recall per variant (mean, std as error bars).

  values: {metric or 'recall_<class>': {variant: [one value per seed]}}.
  """
  fig = plt.figure(figsize=(max(12, 2.8 * len(metrics)), 8.5))
  grid = fig.add_gridspec(2, len(metrics), height_ratios=(1, 1.1))
  spread = lambda v: mean_std(v)[1] or 0.0
  for j, metric in enumerate(metrics):
    ax = fig.add_subplot(grid[0, j])
    for x, variant in enumerate(variants):
      v = np.asarray(values[metric][variant], dtype=np.float64)
      if len(v):
        ax.scatter(x + np.linspace(-0.12, 0.12, len(v)), v, s=14, alpha=0.6)
        ax.errorbar(x, v.mean(), yerr=spread(v), fmt='_', color='black',
                    markersize=22, capsize=5)
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha='right')
    ax.set_title(metric)
    ax.grid(axis='y', alpha=0.3)
  ax = fig.add_subplot(grid[1, :])
  width = 0.8 / len(variants)
  for i, variant in enumerate(variants):
    recall = [np.asarray(values[f'recall_{c}'][variant], dtype=np.float64)
              for c in classes]
    if all(len(r) for r in recall):
      ax.bar(np.arange(len(classes)) + (i - (len(variants) - 1) / 2) *
             width, [r.mean() for r in recall], width, label=variant,
             yerr=[spread(r) for r in recall], capsize=2)
  ax.set_xticks(range(len(classes)), classes)
  ax.set_ylabel('test recall')
  ax.set_ylim(0, 1.05)
  ax.grid(axis='y', alpha=0.3)
  ax.legend(fontsize=8, ncol=min(len(variants), 6))
  _save(fig, path)
