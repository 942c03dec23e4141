"""--mode=train: the training loop, then the test report of the best model."""

import functools
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable

import jax
import ml_collections
from absl import logging
from tqdm import tqdm

from fer_jax import (checkpoints, data, distributed, evaluate, losses, models,
                     reporting, steps)
from fer_jax.data import pipeline


def _improved(value: float, best: float | None, mode: str) -> bool:
  return best is None or (value > best if mode == 'max' else value < best)


def _tensorboard_tag(key: str) -> str:
  """'val_macro_f1' -> 'val/macro_f1', so TensorBoard groups by split."""
  split, _, name = key.partition('_')
  return f'{split}/{name}' if split in ('train', 'val') else key


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def config_changes(path: Path, config: ml_collections.ConfigDict) -> dict:
  """{field: (saved, new)} where config differs from the config.json at
  path (in JSON form); {} if there is none."""
  if not Path(path).exists():
    return {}
  old = flatten(json.loads(Path(path).read_text()))
  new = flatten(reporting.as_json(config))
  return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
          if old.get(k) != new.get(k)}


def _warn_if_config_changed(path: Path, config: ml_collections.ConfigDict
                            ) -> None:
  """Says which fields differ from the config a workdir was started with."""
  changed = config_changes(path, config)
  if changed:
    logging.warning('%s: this run changes %s: %s', path.parent,
                    'these fields' if len(changed) > 1 else 'this field',
                    ', '.join(f'{k} {old!r} -> {new!r}'
                              for k, (old, new) in changed.items()))


def _sample_figure(records, predictions: dict,
                   config: ml_collections.ConfigDict):
  """The first train.num_sample_images of a split with their predictions.

  The same images every epoch, so TensorBoard shows them being learnt.
  """
  n = min(config.train.get('num_sample_images', 8), len(records))
  images = [pipeline.load_image(records[i], config.data) for i in range(n)]
  return reporting.sample_predictions_figure(
      list(records.paths[:n]), images, records.labels[:n],
      predictions['probs'][:n], records.va[:n], predictions['va'][:n])


def _check_finite(metrics: dict, epoch: int, step: int) -> None:
  """Stops a diverged run before it can overwrite a good checkpoint."""
  if not math.isfinite(metrics['loss']):
    raise FloatingPointError(
        f'loss is {metrics["loss"]} at epoch {epoch}, step {step}; stopping '
        'without saving (the last checkpoint is intact). Lower '
        'train.learning_rate or check the data.')


def train_epoch(p_train, state, batches, epoch: int, first: int,
                num_steps: int, sums: dict, save: Callable,
                config: ml_collections.ConfigDict):
  """Steps first..num_steps-1 of epoch `epoch` (0-based), with a progress bar.

  sums: the epoch's metric sums over its first `first` steps (from a
  checkpoint). Every train.checkpoint_every_steps global steps, save(state,
  steps done in the epoch, sums) checkpoints mid-epoch. Metrics come back
  to the host only for the bar (every train.log_every_steps), such a save,
  and at the end. Images/s is timed from the end of the first step, so
  compilation does not count. Returns the state, the epoch's mean metrics
  and images/s.
  """
  every, log_every = (config.train.checkpoint_every_steps,
                      config.train.log_every_steps)
  pending, start, timed = [], None, 0
  bar = tqdm(total=num_steps, initial=first, unit='step', dynamic_ncols=True,
             desc=f'epoch {epoch + 1}/{config.train.num_epochs}',
             mininterval=1.0, disable=not distributed.is_primary())
  for i in range(first, num_steps):
    state, metrics = p_train(state, next(batches))
    pending.append(metrics)
    bar.update()
    if start is None:
      jax.block_until_ready(metrics)
      start = time.perf_counter()
    else:
      timed += 1
    if (i + 1) % log_every == 0 or i + 1 == num_steps:
      last = jax.tree.map(float, steps.unreplicate(metrics))
      rate = timed * config.train.batch_size / (time.perf_counter() - start)
      bar.set_postfix(loss=f"{last['loss']:.3f}",
                      acc=f"{last['accuracy']:.3f}", img_s=f'{rate:.0f}')
    if every and (epoch * num_steps + i + 1) % every == 0 and i + 1 < num_steps:
      sums, pending = _add_metrics(sums, pending), []
      save(state, i + 1, sums)
  bar.close()
  images_per_sec = (timed * config.train.batch_size /
                    (time.perf_counter() - start) if timed else None)
  sums = _add_metrics(sums, pending)
  return state, {k: v / num_steps for k, v in sums.items()}, images_per_sec


def _add_metrics(sums: dict, history: list) -> dict:
  """sums plus the per-step metrics of history (replicated; device 0's)."""
  for metrics in history:
    for key, value in steps.unreplicate(metrics).items():
      sums[key] = sums.get(key, 0.0) + float(value)
  return sums


def split_digest(records) -> str:
  """A fingerprint of the training split: its paths and labels, in order."""
  digest = hashlib.sha1('\n'.join(records.paths.tolist()).encode())
  digest.update(records.labels.tobytes())
  return digest.hexdigest()


def resume_batches(records, config: ml_collections.ConfigDict,
                   num_devices: int, step: int, saved: dict | None):
  """The run's training batches from global step `step` on.

  saved: the checkpoint's data item. Grain's own iterator state (one per
  process) restores the position when the worker and process counts are
  the ones it was saved with; with others the run starts its batches at
  `step`, which gives the same batches (each depends only on the seed and
  its index). Returns this process's iterator and the step its dataset
  starts at (part of its state).
  """
  batches = functools.partial(
      pipeline.train_batches, records, config, num_devices,
      process_index=jax.process_index(), process_count=jax.process_count())
  # Checkpoints from before several processes hold one 'iterator'.
  states = saved and (saved.get('iterators') or [saved['iterator']])
  if (saved and saved['num_workers'] == config.data.num_workers and
      len(states) == jax.process_count()):
    iterator = batches(start_step=saved['first_step'])
    iterator.set_state(states[jax.process_index()])
    return iterator, saved['first_step']
  if saved:
    logging.info('data.num_workers %d and %d processes differ from the '
                 'checkpoint\'s %d and %d: restarting the training batches '
                 'at step %d', config.data.num_workers, jax.process_count(),
                 saved['num_workers'], len(states), step)
  return batches(start_step=step), step


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict:
  """Trains, keeps the best checkpoint, then writes the test report."""
  if not config.train.best_metric.startswith(('val_', 'train_')):
    raise ValueError(f'train.best_metric: {config.train.best_metric!r} must '
                     "name a metrics.jsonl field, e.g. 'val_macro_f1'")
  workdir = Path(workdir)
  # Several processes: each reads its share of every batch; all save
  # checkpoints together; process 0 alone writes the other files.
  primary = distributed.is_primary()
  if primary:
    workdir.mkdir(parents=True, exist_ok=True)
    _warn_if_config_changed(workdir / 'config.json', config)
  num_devices = jax.local_device_count()

  # Data: splits, their report, and the split itself for auditing.
  splits, data_report = evaluate.load_splits(config)
  if primary:
    reporting.write_json(workdir / 'data_report.json', data_report)
    data.save_split(workdir / 'splits.npz', splits)
    reporting.write_json(workdir / 'config.json', config.to_dict())
  num_steps = pipeline.steps_per_epoch(len(splits['train']),
                                       config.train.batch_size)
  logging.info('Data: %s', {k: len(v) for k, v in splits.items()})

  # Model, optimiser and the pmapped steps.
  model = models.create_model(config.model, axis_name=steps.AXIS)
  schedule = steps.learning_rate_fn(config.train, num_steps)
  tx = steps.create_optimizer(config.train, schedule)
  state = steps.create_train_state(model, tx, config.data.image_size,
                                   config.train.seed, config.model.init_from,
                                   ema=config.train.ema_decay > 0)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  if primary:
    (workdir / 'model_summary.txt').write_text(
        models.parameter_summary(variables) + '\n')
    print(f'{config.model.name}: ' + ', '.join(
        f'{k} {n:,}' for k, n in models.parameter_totals(variables).items())
          + f" (every variable in {workdir / 'model_summary.txt'})")
  weights = losses.configured_class_weights(
      config.train, data_report['train']['class_counts'])
  p_train, p_eval = steps.pmap_steps(
      model, tx, config, weights, freeze_backbone_steps=int(
          config.train.freeze_backbone_epochs * num_steps))

  # Resume from the latest checkpoint, if any.
  manager = checkpoints.create_manager(workdir, config)
  meta = {'epoch': 0, 'epoch_step': 0, 'epoch_sums': {}, 'best_value': None,
          'best_epoch': None, 'epochs_without_improvement': 0,
          'stopped_early': False, 'train_seconds': 0.0}
  latest, saved_data = manager.latest_step(), None
  if latest is not None:
    state, saved_meta, saved_data = checkpoints.restore(manager, latest,
                                                        state)
    meta.update(saved_meta)  # older checkpoints lack the mid-epoch fields
    where = (f"step {meta['epoch_step']} of {num_steps} in epoch "
             f"{meta['epoch'] + 1}" if meta['epoch_step'] else
             f"the end of epoch {meta['epoch']}")
    if primary:
      print(f'Resuming from the checkpoint of step {latest} ({where}) in '
            f'{manager.directory}')
      if meta['epoch'] >= config.train.num_epochs or meta['stopped_early']:
        print('Training has finished; evaluating the best checkpoint.')
  if primary:
    reporting.truncate_jsonl(workdir / 'metrics.jsonl', meta['epoch'])
    tensorboard = reporting.TensorBoard(workdir / 'tb')
  state = steps.replicate(state)
  digest = split_digest(splits['train'])
  if saved_data and saved_data.get('train_digest', digest) != digest:
    raise ValueError(
        f'{workdir}: the training split differs from the one this run was '
        'checkpointed with (files added, removed or now skipped), so it '
        'cannot continue with the same data. Restore the data, or start a '
        'new --workdir.')
  batches, first_step = None, 0
  if meta['epoch'] < config.train.num_epochs and not meta['stopped_early']:
    batches, first_step = resume_batches(splits['train'], config,
                                         num_devices, latest or 0, saved_data)

  # Wall time of training and validation, over all sessions of the run.
  clock, seconds_before = time.perf_counter(), meta['train_seconds']
  elapsed = lambda: seconds_before + time.perf_counter() - clock

  def save(state, step: int, metrics: dict | None = None) -> None:
    meta['train_seconds'] = elapsed()
    data_state = {'step': step, 'first_step': first_step,
                  'num_workers': config.data.num_workers,
                  'train_digest': digest,
                  'iterators': distributed.gather_json(batches.get_state())}
    checkpoints.save(manager, step, steps.unreplicate(state), meta,
                     data_state, metrics)

  def save_mid_epoch(state, epoch_step: int, sums: dict) -> None:
    step = meta['epoch'] * num_steps + epoch_step
    _check_finite(sums, meta['epoch'] + 1, step)
    meta.update(epoch_step=epoch_step, epoch_sums=sums)
    save(state, step)

  for epoch in range(meta['epoch'], config.train.num_epochs):
    if meta['stopped_early']:
      break
    # Train one epoch (from a mid-epoch checkpoint's step, if resumed).
    state, train_metrics, images_per_sec = train_epoch(
        p_train, state, batches, epoch, meta['epoch_step'], num_steps,
        dict(meta['epoch_sums']), save_mid_epoch, config)
    step = (epoch + 1) * num_steps
    _check_finite(train_metrics, epoch + 1, step)

    # Evaluate on val.
    val_metrics, val_out = evaluate.evaluate_records(p_eval, state,
                                                     splits['val'], config)
    record = {'epoch': epoch + 1, 'step': step,
              'learning_rate': float(schedule(step - 1)),  # the last step's
              'images_per_sec': images_per_sec,
              'train_seconds': elapsed(),
              **{f'train_{k}': v for k, v in train_metrics.items()},
              **{f'val_{k}': v for k, v in val_metrics.items()
                 if isinstance(v, (int, float))}}
    if config.train.best_metric not in record:
      raise ValueError(f'train.best_metric: {config.train.best_metric!r} is '
                       f'not one of {sorted(record)}')
    value = record[config.train.best_metric]

    # Checkpoint, log, and stop early when val stops improving.
    if _improved(value, meta['best_value'], config.train.best_mode):
      meta.update(best_value=value, best_epoch=epoch + 1,
                  epochs_without_improvement=0)
    else:
      meta['epochs_without_improvement'] += 1
    patience = config.train.early_stopping_patience
    stop = bool(patience and meta['epochs_without_improvement'] >= patience)
    meta.update(epoch=epoch + 1, epoch_step=0, epoch_sums={},
                stopped_early=stop)
    save(state, step, {config.train.best_metric: value})
    if primary:
      reporting.append_jsonl(workdir / 'metrics.jsonl', record)
      tensorboard.scalars(step, {_tensorboard_tag(k): v
                                 for k, v in record.items()
                                 if k not in ('epoch', 'step')})
      tensorboard.figure(step, 'val/samples', _sample_figure(
          splits['val'], val_out, config))
    logging.info('epoch %d: train loss %.4f acc %.4f | val loss %.4f acc '
                 '%.4f macro F1 %.4f | %.0f img/s', epoch + 1,
                 record['train_loss'], record['train_accuracy'],
                 record['val_loss'], record['val_accuracy'],
                 record['val_macro_f1'], images_per_sec or 0.0)
    if meta['stopped_early'] and primary:
      print(f'Stopping early: {config.train.best_metric} has not improved '
            f'for {patience} epochs (best {meta["best_value"]:.4f} at epoch '
            f'{meta["best_epoch"]}).')
  manager.wait_until_finished()
  if batches is not None:
    batches.close()
  if primary:
    tensorboard.close()

  # Test the best checkpoint and write the report.
  best_step = manager.best_step()
  best_state, _, _ = checkpoints.restore(manager, best_step,
                                         steps.unreplicate(state))
  test_metrics, predictions = evaluate.evaluate_records(
      p_eval, steps.replicate(best_state), splits['test'], config)
  test_metrics.update(checkpoint_step=best_step, best_epoch=meta['best_epoch'],
                      epochs_trained=meta['epoch'],
                      train_seconds=meta['train_seconds'])
  manager.close()
  if not primary:
    return test_metrics
  evaluate.write_split_report(workdir, 'test', test_metrics, predictions,
                              splits['test'], config)
  print(f"\nBest checkpoint: epoch {meta['best_epoch']} (step {best_step}, "
        f"{config.train.best_metric} {meta['best_value']:.4f})")
  print(reporting.format_summary(test_metrics, 'test'))
  print(f'\nFiles in {workdir}: report/ (summary.md, test_metrics.json, '
        'confusion_matrix.png, curves.png, va_scatter.png), metrics.jsonl, '
        'data_report.json, config.json, checkpoints/, tb/')
  return test_metrics
