"""What a run says and records: its log lines, metrics.jsonl, TensorBoard,
and the report of a split (metrics, figures, summary page)."""

import sys
from pathlib import Path
from typing import Callable

import jax
import ml_collections
from tqdm import tqdm

from fer_jax import config_rules, distributed, figures, files
from fer_jax.data.index import Records


def summary_writer() -> type:
  """tensorboardX's SummaryWriter, imported without PyTorch.

  Where PyTorch is installed (as for the tests), tensorboardX imports it
  (2 s) only to accept torch tensors; fer_jax gives it NumPy. PyTorch
  stays importable afterwards.
  """
  if 'torch' in sys.modules or 'tensorboardX' in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules['torch'] = None  # `import torch` raises ImportError
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules['torch']
  return SummaryWriter


def _tensorboard_tag(key: str) -> str:
  """'val_macro_f1' -> 'val/macro_f1', so TensorBoard groups by split."""
  split, _, name = key.partition('_')
  return f'{split}/{name}' if split in ('train', 'val') else key


class Writer:
  """Lines for the user, metrics.jsonl and TensorBoard of one workdir.

  Silent outside process 0, which alone writes a run's files: code that
  reports goes through it instead of checking the process itself.
  """

  def __init__(self, workdir: Path, active: bool):
    self.workdir, self.active = Path(workdir), active
    self._tensorboard = None  # opened by the first record
    self._purge_step = None   # TensorBoard hides its events from this step

  def write(self, write_files: Callable, *args, **kwargs) -> None:
    """write_files(*args, **kwargs) in process 0 only. Every process calls
    it: with several, a failure in process 0 stops them all at once."""
    if jax.process_count() > 1:
      distributed.on_primary(write_files, *args, **kwargs)
    elif self.active:
      write_files(*args, **kwargs)

  def __enter__(self) -> 'Writer':
    return self

  def __exit__(self, *exception) -> None:
    self.close()

  def say(self, text: str) -> None:
    if self.active:
      print(text, flush=True)

  def progress(self, total: int, initial: int, desc: str) -> tqdm:
    """A progress bar (shown by process 0 only)."""
    return tqdm(total=total, initial=initial, unit='step', desc=desc,
                dynamic_ncols=True, mininterval=1.0, disable=not self.active)

  def keep_records_until(self, step: int) -> None:
    """Drops metrics.jsonl lines past step, and hides TensorBoard's events
    past it: work lost to a crash, to be done (and written) again, once."""
    path = self.workdir / 'metrics.jsonl'
    records = files.read_jsonl(path) if self.active else []
    if any(r['step'] > step for r in records):
      files.write_jsonl(path, [r for r in records if r['step'] <= step])
    self._purge_step = step + 1

  def record(self, record: dict, samples=None) -> None:
    """One line of metrics.jsonl and its scalars in TensorBoard (every
    process calls it; process 0 writes).

    samples: a function that draws a figure for TensorBoard (called by
    process 0 only).
    """
    self.write(self._record, record, samples)

  def _record(self, record: dict, samples) -> None:
    files.append_jsonl(self.workdir / 'metrics.jsonl', record)
    if self._tensorboard is None:
      self._tensorboard = summary_writer()(str(self.workdir / 'tb'),
                                           purge_step=self._purge_step)
    step = record['step']
    for key, value in record.items():
      if key not in ('epoch', 'step') and value is not None:
        self._tensorboard.add_scalar(_tensorboard_tag(key), float(value),
                                     step)
    if samples is not None:
      self._tensorboard.add_figure('val/samples', samples(), step, close=True)
    self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def write_split_report(folder: Path, split: str, result: dict,
                       predictions: dict, records: Records,
                       config: ml_collections.ConfigDict,
                       curves: list[dict] | None = None) -> None:
  """A split's report in folder: the figures, summary.md, then
  {split}_metrics.json (last, so that its presence means complete).

  curves: metrics.jsonl's records, drawn as curves.png (training's report).
  """
  folder, classes = Path(folder), result['classes']
  names = {'confusion matrix': 'confusion_matrix.png'}
  figures.plot_confusion_matrix(
      folder / names['confusion matrix'], result['confusion_matrix'],
      f"{split}: accuracy {result['accuracy']:.3f}, macro F1 "
      f"{result['macro_f1']:.3f}", classes)
  mask = records.va_mask
  if mask.any():  # data sets without valence/arousal have no such figure
    names['valence and arousal'] = 'va_scatter.png'
    figures.plot_va_scatter(folder / names['valence and arousal'],
                            records.va[mask], predictions['va'][mask],
                            records.labels[mask], result, classes)
  if curves:
    names['training curves'] = 'curves.png'
    figures.plot_curves(folder / 'curves.png', curves)
  files.write_text(folder / 'summary.md', summary_markdown(
      split, result, config_rules.as_json(config), names))
  files.write_json(folder / f'{split}_metrics.json', result)


def format_summary(metrics: dict, split: str) -> str:
  """A one-screen table of a split's metrics."""
  lines = [f"{split}: {metrics['num_examples']} images "
           f"({metrics['num_va_examples']} with valence/arousal)",
           f"  accuracy {metrics['accuracy']:.4f}   balanced accuracy "
           f"{metrics['balanced_accuracy']:.4f}   macro F1 "
           f"{metrics['macro_f1']:.4f}   weighted F1 "
           f"{metrics['weighted_f1']:.4f}"]
  for name in ('valence', 'arousal'):
    values = '   '.join(
        f'{k.upper()} {metrics[f"{name}_{k}"]:.4f}'
        for k in ('rmse', 'mae', 'pcc', 'ccc', 'sagr')
        if metrics[f'{name}_{k}'] is not None)
    lines.append(f'  {name:8s} {values or "n/a (no valence/arousal labels)"}')
  lines.append('  per class    precision  recall     f1  support')
  for name, row in metrics['per_class'].items():
    lines.append(f"  {name:10s} {row['precision']:10.3f} {row['recall']:7.3f}"
                 f" {row['f1']:6.3f} {row['support']:8d}")
  return '\n'.join(lines)


def markdown_table(header: list[str], rows: list[list],
                   missing: str = '-') -> list[str]:
  """Markdown table lines; floats with 4 decimals, None as `missing`."""
  def cell(v):
    if v is None:
      return missing
    return f'{v:.4f}' if isinstance(v, float) else str(v)
  return (['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join('---' if i == 0 else '---:'
                          for i in range(len(header))) + '|'] +
          ['| ' + ' | '.join(cell(v) for v in row) + ' |' for row in rows])


def run_essentials(config: dict) -> list[tuple[str, str]]:
  """(name, description) of a run's model, data and training recipe."""
  model, data, train = config['model'], config['data'], config['train']
  source = ('generated synthetic set' if data['layout'] == 'synthetic'
            else f"{data['layout']} layout at {data['root']}")
  return [
      ('model', f"{model['name']}, {model['dtype']}, "
                f"{model.get('init_from') or 'from scratch'}"),
      ('data', f"{source}, {data['image_size']} px, validation "
               f"'{data['validation']}', sampler '{data['sampler']}'"),
      ('training', f"{train['num_epochs']} epochs, batch {train['batch_size']},"
                   f" {train['optimizer']} at {train['learning_rate']:g} "
                   f"({train['schedule']}), class weights "
                   f"'{train['class_weights']}', VA loss "
                   f"'{train.get('va_loss', 'mse')}' x "
                   f"{train['va_loss_weight']:g}"),
  ]


def summary_markdown(split: str, metrics: dict, config: dict,
                     figures: dict[str, str]) -> str:
  """One page for a split: the run's essentials, metrics, classes, figures.

  config: the resolved config as a dict; figures: {caption: file name
  relative to the page}.
  """
  essentials = run_essentials(config) + [
      ('checkpoint', f"step {metrics.get('checkpoint_step')}"
                     + (f", best epoch {metrics['best_epoch']}"
                        if metrics.get('best_epoch') else '')),
      ('test-time augmentation', config.get('eval', {}).get('tta', 'none')),
      ('classes', ', '.join(metrics['classes'])),
  ]
  lines = [f'# {split}: {metrics["num_examples"]} images', '']
  lines += [f'- **{name}**: {value}' for name, value in essentials]
  lines += ['', '## Expression', ''] + markdown_table(
      ['accuracy', 'balanced accuracy', 'macro F1', 'weighted F1'],
      [[metrics[k] for k in ('accuracy', 'balanced_accuracy', 'macro_f1',
                             'weighted_f1')]])
  lines += ['', f"## Valence and arousal ({metrics['num_va_examples']} "
            'images with both)', ''] + markdown_table(
      ['', 'RMSE', 'MAE', 'PCC', 'CCC', 'SAGR'],
      [[name] + [metrics[f'{name}_{k}'] for k in ('rmse', 'mae', 'pcc',
                                                  'ccc', 'sagr')]
       for name in ('valence', 'arousal')], missing='n/a')
  lines += ['', '## Per class', ''] + markdown_table(
      ['class', 'precision', 'recall', 'F1', 'support'],
      [[name, row['precision'], row['recall'], row['f1'], row['support']]
       for name, row in metrics['per_class'].items()])
  lines += ['', '## Figures', '']
  lines += [f'![{caption}]({name})' for caption, name in figures.items()]
  return '\n'.join(lines) + '\n'
