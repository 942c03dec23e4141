"""--mode=evaluate: a checkpoint on one split, with the report files."""

import json
from pathlib import Path
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from fer_jax import (checkpoints, data, distributed, losses, metrics, models,
                     reporting, steps)
from fer_jax.data import pipeline
from fer_jax.data.index import Records


def load_splits(config: ml_collections.ConfigDict) -> tuple[dict, dict]:
  """data.load_splits, in process 0 first (it generates or indexes the data
  set); the others then read that, and never draw the set again."""
  if not distributed.is_primary():
    config = config.copy_and_resolve_references()
    config.data.synthetic.regenerate = False
  return distributed.primary_first(data.load_splits, config)


def predict_records(p_eval: Callable, state: steps.TrainState,
                    records: Records, config: ml_collections.ConfigDict
                    ) -> dict:
  """Probabilities [N, 8], valence/arousal [N, 2] and loss sums of a split.

  Outputs stream to the host batch by batch, so no split's logits are held
  on the device. With several processes each evaluates its share and all
  receive every prediction (the sums are already over all devices).
  """
  probs, va, sums = [], [], None
  for batch in pipeline.eval_batches(records, config, jax.local_device_count(),
                                     jax.process_index(), jax.process_count()):
    out = steps.local_values(p_eval(state, batch))
    keep = batch['mask'].reshape(-1)
    probs.append(out['probs'].reshape(-1, out['probs'].shape[-1])[keep])
    va.append(out['va'].reshape(-1, 2)[keep])
    batch_sums = jax.tree.map(lambda x: np.asarray(x[0], np.float64),
                              out['sums'])
    sums = batch_sums if sums is None else jax.tree.map(
        np.add, sums, batch_sums)
  return {'probs': distributed.gather_rows(np.concatenate(probs), len(records)),
          'va': distributed.gather_rows(np.concatenate(va), len(records)),
          'sums': sums}


def evaluate_records(p_eval: Callable, state: steps.TrainState,
                     records: Records, config: ml_collections.ConfigDict
                     ) -> tuple[dict, dict]:
  """All report metrics of a split (with its losses), and the predictions."""
  out = predict_records(p_eval, state, records, config)
  result = metrics.compute_metrics(records.labels, out['probs'].argmax(-1),
                                   records.va, out['va'], records.va_mask)
  loss = losses.normalise(out['sums'], config.train.va_loss_weight,
                          config.train.get('va_loss', 'mse'))
  result.update({k: float(v) for k, v in loss.items() if k != 'accuracy'})
  return result, out


def write_split_report(workdir: Path, split: str, result: dict,
                       predictions: dict, records: Records,
                       config: ml_collections.ConfigDict) -> None:
  """report/{split}_metrics.json, the split's figures and summary page.

  The test split's files are report/confusion_matrix.png, va_scatter.png
  and summary.md; other splits' carry the split name as a prefix. The
  training curves (curves.png) come from metrics.jsonl when it exists.
  """
  workdir = Path(workdir)
  report = workdir / 'report'
  prefix = '' if split == 'test' else f'{split}_'
  reporting.write_json(report / f'{split}_metrics.json', result)
  figures = {'confusion matrix': f'{prefix}confusion_matrix.png',
             'valence and arousal': f'{prefix}va_scatter.png'}
  reporting.plot_confusion_matrix(
      report / figures['confusion matrix'], result['confusion_matrix'],
      f"{split}: accuracy {result['accuracy']:.3f}, macro F1 "
      f"{result['macro_f1']:.3f}")
  mask = records.va_mask
  reporting.plot_va_scatter(report / figures['valence and arousal'],
                            records.va[mask], predictions['va'][mask],
                            records.labels[mask], result)
  if (workdir / 'metrics.jsonl').exists():
    figures['training curves'] = 'curves.png'
    reporting.plot_curves(report / 'curves.png',
                          reporting.read_jsonl(workdir / 'metrics.jsonl'))
  (report / f'{prefix}summary.md').write_text(reporting.summary_markdown(
      split, result, reporting.as_json(config), figures))


def restore_for_inference(config: ml_collections.ConfigDict, workdir: Path,
                          checkpoint_step: int | None,
                          weights: np.ndarray | None = None):
  """The replicated state of a checkpoint, the pmapped eval step, the step.

  weights: the class weights of the loss that evaluation reports.
  """
  model = models.create_model(config.model, axis_name=steps.AXIS)
  tx = steps.create_optimizer(config.train, steps.learning_rate_fn(
      config.train, 1))
  template = steps.create_train_state(
      model, tx, config.data.image_size, config.train.seed,
      ema=config.train.get('ema_decay', 0.0) > 0)  # older runs lack it
  manager = checkpoints.create_manager(workdir, config, read_only=True)
  step = checkpoints.checkpoint_step(manager, checkpoint_step)
  state, _, _ = checkpoints.restore(manager, step, template)
  logging.info('Restored the checkpoint of step %d from %s', step,
               manager.directory)
  _, p_eval = steps.pmap_steps(model, tx, config, weights)
  return steps.replicate(state), p_eval, step


def with_trained_model(config: ml_collections.ConfigDict, workdir: Path
                       ) -> ml_collections.ConfigDict:
  """config with the settings of the run in workdir that its results hang on.

  From the run's config.json: the model, the training section (loss terms
  and optimiser, so the checkpoint restores and losses mean the same), the
  input (image size, face margin, normalisation) and how the splits were drawn
  (validation protocol, fraction, seed, the generated set). From the
  command line: where the data is (layout, root), error handling, workers
  and the evaluation batch size.
  """
  path = Path(workdir) / 'config.json'
  if not path.exists():
    raise FileNotFoundError(f'{path}: not found; is {workdir} a training '
                            'workdir?')
  saved = ml_collections.ConfigDict(json.loads(path.read_text()))
  config = config.copy_and_resolve_references()
  eval_batch_size = config.train.eval_batch_size
  config.model, config.train = saved.model, saved.train
  config.train.eval_batch_size = eval_batch_size
  config.data.synthetic = saved.data.synthetic
  config.data.synthetic.regenerate = False
  for key in ('image_size', 'face_margin', 'mean_rgb', 'std_rgb',
              'validation', 'val_fraction', 'split_seed'):
    # .get: runs saved before a field existed used its default.
    config.data[key] = type(config.data[key])(saved.data.get(
        key, config.data[key]))
  return config


def _warn_if_split_changed(path: Path, split: str, records: Records) -> None:
  """Says so when a split's images are not the ones training recorded."""
  if not path.exists():
    return
  with np.load(path) as saved:
    if split in saved and not np.array_equal(saved[split], records.paths):
      then = set(saved[split].tolist())
      now = set(records.paths.tolist())
      logging.warning('%s: split %r differs from the one training used: %d '
                      'images no longer in it, %d new (other data, or files '
                      'changed or skipped)', path.parent, split,
                      len(then - now), len(now - then))


def evaluate(config: ml_collections.ConfigDict, workdir: str, split: str,
             checkpoint_step: int | None = None) -> dict:
  """Evaluates the best (or given) checkpoint of workdir on one split."""
  workdir = Path(workdir)
  config = with_trained_model(config, workdir)
  splits, data_report = load_splits(config)
  if split not in splits:
    raise ValueError(f'--split: {split!r} is not one of {sorted(splits)}')
  primary = distributed.is_primary()
  if primary:  # beside the metrics: the workdir's data_report.json is training's
    reporting.write_json(workdir / 'report' / f'{split}_data_report.json',
                         data_report)
    _warn_if_split_changed(workdir / 'splits.npz', split, splits[split])
  weights = losses.configured_class_weights(
      config.train, data_report['train']['class_counts'])
  state, p_eval, step = restore_for_inference(config, workdir,
                                              checkpoint_step, weights)
  result, predictions = evaluate_records(p_eval, state, splits[split], config)
  result['checkpoint_step'] = step
  if primary:
    write_split_report(workdir, split, result, predictions, splits[split],
                       config)
    print(reporting.format_summary(result, split))
    print(f"Report: {workdir / 'report'}/{split}_metrics.json")
  return result
