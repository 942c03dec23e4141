"""--mode=train: the training loop, then the test report of the best model.

Everything about the workdir is decided before anything in it changes
(workdir.decide): a fresh run writes its record, a resumed one continues
from its latest complete checkpoint, a finished one shows its report, and
a refused one leaves every file as it was.
"""

import contextlib
import dataclasses
import functools
import math
import time
from pathlib import Path

import jax
import ml_collections
from absl import logging

from fer_jax import (checkpoints, config_rules, data, distributed, files,
                     figures, inference, labels, losses, models, reporting,
                     steps, workdir as workdir_lib)
from fer_jax.checkpoints import Progress
from fer_jax.config_rules import UsageError
from fer_jax.data import pipeline


@dataclasses.dataclass
class StepRates:
  """Images/s of the train step over finished steps: the progress bar's
  over the last window between two marks, metrics.jsonl's over the epoch.
  The epoch's first step is left out (it may compile, or wait for data)."""
  batch_size: int
  first: tuple[float, int] | None = None  # (time, steps done) at 1st mark
  last: tuple[float, int] | None = None
  window: float | None = None

  @property
  def started(self) -> bool:
    return self.first is not None

  def mark(self, done: int, now: float) -> None:
    """Step `done` has finished at time `now` (seconds)."""
    if self.last is not None and done > self.last[1] and now > self.last[0]:
      self.window = ((done - self.last[1]) * self.batch_size /
                     (now - self.last[0]))
    self.first = self.first or (now, done)
    self.last = (now, done)

  def epoch(self) -> float | None:
    """Since the first mark; None before two marks."""
    if self.first is None or self.last[1] == self.first[1]:
      return None
    return ((self.last[1] - self.first[1]) * self.batch_size /
            (self.last[0] - self.first[0]))


def _due(done: int, steps_per_epoch: int, train: ml_collections.ConfigDict
         ) -> tuple[bool, bool, bool]:
  """(log, validate, checkpoint) after `done` steps: validation closes each
  epoch; checkpoints come then and every train.checkpoint_every_steps;
  the progress bar's numbers every train.log_every_steps and at the end of
  each epoch."""
  end = done % steps_per_epoch == 0
  every = train.checkpoint_every_steps
  return (end or done % train.log_every_steps == 0, end,
          end or bool(every and done % every == 0))


def _improved(value: float, best: float | None, mode: str) -> bool:
  """Strictly better: among equal values the earliest stays the best."""
  return best is None or (value > best if mode == 'max' else value < best)


def _check_finite(sums: dict, epoch: int, step: int) -> None:
  """Stops a diverged run before it can save a bad checkpoint."""
  if not math.isfinite(sums['loss']):
    raise FloatingPointError(
        f'loss is {sums["loss"]} at epoch {epoch}, step {step}; stopping '
        'without saving (the last checkpoint is intact). Lower '
        'train.learning_rate or check the data.')


def _add_metrics(sums: dict, history: list) -> dict:
  """sums plus the per-step metrics of history (replicated; device 0's)."""
  sums = dict(sums)
  for metrics in history:
    for key, value in steps.unreplicate(metrics).items():
      sums[key] = sums.get(key, 0.0) + float(value)
  return sums


def _sample_figure(records, predictions: dict,
                   config: ml_collections.ConfigDict):
  """The first train.num_sample_images of a split with their predictions.

  The same images every epoch, so TensorBoard shows them being learnt.
  """
  n = min(config.train.num_sample_images, len(records))
  images = [pipeline.load_image(records[i], config.data) for i in range(n)]
  return figures.sample_predictions_figure(
      list(records.paths[:n]), images, records.labels[:n],
      predictions['probs'][:n], records.va[:n], predictions['va'][:n],
      labels.run_classes(config))


def _epoch_record(progress: Progress, steps_per_epoch: int,
                  learning_rate: float, images_per_sec: float | None,
                  val_metrics: dict) -> dict:
  """The metrics.jsonl line of the epoch that progress has just ended."""
  return {'epoch': progress.step // steps_per_epoch, 'step': progress.step,
          'learning_rate': float(learning_rate),  # the epoch's last step's
          'images_per_sec': images_per_sec,
          'train_seconds': progress.train_seconds,
          **{f'train_{k}': v / steps_per_epoch
             for k, v in progress.epoch_sums.items()},
          **{f'val_{k}': v for k, v in val_metrics.items()
             if isinstance(v, (int, float))}}


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


def _finished(writer: reporting.Writer, workdir: Path) -> dict:
  """The test report of a finished run, shown again; nothing is written."""
  report = workdir_lib.read_json(workdir_lib.test_report(workdir))
  writer.say(f"{workdir}: finished ({report.get('epochs_trained')} epochs); "
             f"the test report of step {report.get('checkpoint_step')}, as "
             'training wrote it:')
  writer.say(reporting.format_summary(report, 'test'))
  return report


def _restore_latest(workdir: Path, config: ml_collections.ConfigDict,
                    template: steps.TrainState, steps_per_epoch: int,
                    resumable: bool):
  """(state, progress, data item, step, unreadable steps) of the latest
  complete checkpoint; the unreadable ones are those after it, and the
  best step it records if damaged. (template, Progress(), None, None, [])
  if there is none or not resumable (no checkpoints folder)."""
  if not resumable:
    return template, Progress(), None, None, []
  reader = checkpoints.create_manager(workdir, config, read_only=True)

  def read(step):
    rules = steps.rules_of(checkpoints.read_meta(reader, step))
    if rules != steps.TRAINING_RULES:
      raise UsageError(
          f'{workdir}: step {step} was trained under training rules {rules} '
          f'and this fer_jax trains under rules {steps.TRAINING_RULES} '
          '(fer_jax/steps.py: TRAINING_RULES); one run under two rules '
          'would be one record of two recipes. Finish it with the fer_jax '
          'that started it, or start a new --workdir.')
    return checkpoints.restore(reader, step, template)

  try:
    step, restored, broken = checkpoints.latest_complete(reader, read)
    if step is None:
      return template, Progress(), None, None, []
    state, meta, saved_data = restored
    progress = Progress.from_meta(meta, steps_per_epoch)
    # The best checkpoint is tested at the end: a damaged one is set aside
    # now, and the best of those kept is tested instead.
    best = progress.best_step
    if (best != step and best in reader.all_steps() and
        not checkpoints.sound(reader, best)):
      broken.append(best)
  finally:
    reader.close()
  return state, progress, saved_data, step, broken


def _where(step: int, steps_per_epoch: int) -> str:
  epoch, epoch_step = divmod(step, steps_per_epoch)
  return (f'step {epoch_step} of {steps_per_epoch} in epoch {epoch + 1}'
          if epoch_step else f'the end of epoch {epoch}')


def _end_epoch(writer: reporting.Writer, progress: Progress,
               config: ml_collections.ConfigDict, steps_per_epoch: int,
               learning_rate: float, images_per_sec: float | None,
               val_metrics: dict, samples) -> dict:
  """Closes the epoch that progress has just ended: its metrics.jsonl line
  (before the checkpoint that it describes: a crash in between redoes the
  epoch and drops the line first), the best so far and early stopping.
  Returns the value that ranks the epoch's checkpoint."""
  record = _epoch_record(progress, steps_per_epoch, learning_rate,
                         images_per_sec, val_metrics)
  train = config.train
  value = record.get(train.best_metric)
  if value is None or math.isnan(value):  # undefined (a PCC of constants)
    value = -math.inf if train.best_mode == 'max' else math.inf
  if _improved(value, progress.best_value, train.best_mode):
    progress.best_value, progress.best_step = value, progress.step
    progress.epochs_without_improvement = 0
  else:
    progress.epochs_without_improvement += 1
  progress.stopped_early = bool(
      train.early_stopping_patience and
      progress.epochs_without_improvement >= train.early_stopping_patience)
  progress.epoch_sums = {}
  writer.record(record, samples)
  logging.info('epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f '
               'macro F1 %.4f | %.0f img/s', record['epoch'],
               record['train_loss'], record['train_accuracy'],
               record['val_loss'], record['val_accuracy'],
               record['val_macro_f1'], images_per_sec or 0.0)
  if progress.stopped_early:
    writer.say(f'Stopping early: {train.best_metric} has not improved for '
               f'{train.early_stopping_patience} epochs (best '
               f'{progress.best_value:.4f} at step {progress.best_step}).')
  return {train.best_metric: value}


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict:
  """Trains, keeps the best checkpoint, then writes the test report."""
  workdir = Path(workdir)
  config_rules.check(config, jax.device_count())
  status, changed = workdir_lib.decide(workdir, config)
  writer = reporting.Writer(workdir, distributed.is_primary())
  if status == workdir_lib.FINISHED:
    return _finished(writer, workdir)
  # Read before process 0 can create the folder: every process restores.
  resumable = (workdir / 'checkpoints').exists()

  # Data, checked against the splits the run recorded. Every process has
  # decided before process 0 (first in load_splits) can write below.
  splits, data_report = data.load_splits_all_processes(config)
  differences = (workdir_lib.split_differences(workdir, splits,
                                               data_report['root'])
                 if status == workdir_lib.RESUME else {})
  if differences:
    raise UsageError(
        f'{workdir}: the data differs from the splits this run recorded '
        '(splits.npz): ' + '; '.join(f'{k}: {v}' for k, v in
                                      differences.items()) +
        '. Restore the data, or start a new --workdir.')
  splits = pipeline.hold_decoded(splits, config.data)
  num_steps = pipeline.steps_per_epoch(len(splits['train']),
                                       config.train.batch_size)
  if num_steps == 0:
    raise UsageError(f'train.batch_size: {config.train.batch_size} is more '
                     f"than the {len(splits['train'])} training examples")
  total_steps = config.train.num_epochs * num_steps
  logging.info('Data: %s', {k: len(v) for k, v in splits.items()})

  # Model, optimiser, the pmapped steps, and the latest complete
  # checkpoint (model.init_from is read only without one: a checkpoint
  # holds every weight).
  model = models.create_model(config.model, axis_name=steps.AXIS,
                              num_classes=len(labels.run_classes(config)))
  schedule = steps.learning_rate_fn(config.train, num_steps)
  tx = steps.create_optimizer(config.train, schedule, num_steps)
  new_state = functools.partial(
      steps.create_train_state, model, tx, config.data.image_size,
      config.train.seed, ema=config.train.ema_decay > 0)
  weights = losses.configured_class_weights(
      config.train, data_report['train']['class_counts'])
  p_train, p_eval = steps.pmap_steps(model, tx, config, weights)
  state, progress, saved_data, restored_step, broken = _restore_latest(
      workdir, config, new_state(), num_steps, resumable)
  if restored_step is None and config.model.init_from:
    state = new_state(init_from=config.model.init_from)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  writer.say(f'{config.model.name}: ' + ', '.join(
      f'{k} {n:,}' for k, n in models.parameter_totals(variables).items()))

  # Decided: from here on the run writes to its workdir.
  with contextlib.ExitStack() as cleanup:
    cleanup.enter_context(writer)
    if status == workdir_lib.FRESH:
      writer.write(workdir_lib.write_record, workdir, config, splits,
                   data_report, models.parameter_summary(variables))
    writer.write(workdir_lib.log_changes, workdir, changed)
    for folder in (workdir, workdir / 'report'):  # only training writes here
      writer.write(files.remove_leftovers, folder)
    if broken:
      writer.say(f'Checkpoints {broken} are unreadable; they move to '
                 'checkpoints_unreadable/')
      writer.write(checkpoints.set_aside, workdir, broken)
      distributed.barrier('unreadable checkpoints set aside')
    if restored_step is not None:
      writer.say(f'Resuming from the checkpoint of step {restored_step} '
                 f"({_where(progress.step, num_steps)}) in "
                 f"{workdir / 'checkpoints'}")
    writer.keep_records_until(progress.step)
    manager = checkpoints.create_manager(workdir, config)
    cleanup.callback(manager.close)
    last_step = progress.step if progress.stopped_early else total_steps
    if progress.step < last_step:
      batches, first_step = resume_batches(
          splits['train'], config, jax.local_device_count(), progress.step,
          saved_data)
      cleanup.callback(batches.close)
    state = steps.replicate(state)
    clock, seconds_before = time.perf_counter(), progress.train_seconds
    bar, pending = None, []

    # One flat loop over the run's steps.
    for step in range(progress.step, last_step):
      epoch = step // num_steps
      if bar is None:
        bar = writer.progress(num_steps, step % num_steps,
                              f'epoch {epoch + 1}/{config.train.num_epochs}')
        rates = StepRates(config.train.batch_size)
      state, metrics = p_train(state, next(batches))
      pending.append(metrics)
      bar.update()
      done = step + 1
      log, validate, checkpoint = _due(done, num_steps, config.train)
      if log or not rates.started:
        jax.block_until_ready(metrics)  # images/s over finished steps only
        rates.mark(done, time.perf_counter())
      if log:
        last = jax.tree.map(float, steps.unreplicate(metrics))
        bar.set_postfix(loss=f"{last['loss']:.3f}",
                        acc=f"{last['accuracy']:.3f}",
                        img_s=f'{rates.window or 0:.0f}')
      if not checkpoint:
        continue
      progress.epoch_sums = _add_metrics(progress.epoch_sums, pending)
      pending = []
      _check_finite(progress.epoch_sums, epoch + 1, done)
      progress.step, ranked = done, None
      if validate:
        bar.close()
        bar = None
        val_metrics, val_out = inference.evaluate_records(
            p_eval, state, splits['val'], config)
      progress.train_seconds = seconds_before + time.perf_counter() - clock
      if validate:
        ranked = _end_epoch(writer, progress, config, num_steps,
                            schedule(done - 1), rates.epoch(), val_metrics,
                            functools.partial(_sample_figure, splits['val'],
                                              val_out, config)
                            if config.train.num_sample_images else None)
      checkpoints.save(manager, done, steps.unreplicate(state),
                       dataclasses.asdict(progress),
                       {'first_step': first_step,
                        'num_workers': config.data.num_workers,
                        'iterators': distributed.gather_json(
                            batches.get_state())}, ranked)
      if progress.stopped_early:
        break
    manager.wait_until_finished()
    return _test_best(writer, manager, steps.unreplicate(state), progress,
                      p_eval, splits['test'], config, num_steps)


def _test_best(writer: reporting.Writer, manager, state, progress: Progress,
               p_eval, records, config: ml_collections.ConfigDict,
               steps_per_epoch: int) -> dict:
  """Evaluates the best kept checkpoint on the test split, writes the
  report and says where it is; the test metrics."""
  workdir = writer.workdir
  best = checkpoints.best_kept(manager, progress.best_step, config.train)
  best_state, _, _ = checkpoints.restore(manager, best, state)
  test_metrics, predictions = inference.evaluate_records(
      p_eval, steps.replicate(best_state), records, config)
  test_metrics.update(checkpoint_step=best,
                      best_epoch=best // steps_per_epoch,
                      epochs_trained=progress.step // steps_per_epoch,
                      stopped_early=progress.stopped_early,
                      train_seconds=progress.train_seconds,
                      training_rules=progress.training_rules)
  writer.write(reporting.write_split_report, workdir / 'report', 'test',
               test_metrics, predictions, records, config,
               curves=files.read_jsonl(workdir / 'metrics.jsonl'))
  writer.say(f'\nBest checkpoint: epoch {best // steps_per_epoch} (step '
             f'{best}, {config.train.best_metric} {progress.best_value:.4f})')
  writer.say(reporting.format_summary(test_metrics, 'test'))
  writer.say(f'\nFiles in {workdir}: report/ (summary.md, test_metrics.json, '
             'confusion_matrix.png, curves.png, va_scatter.png), '
             'metrics.jsonl, data_report.json, face_contract.json, '
             'splits.npz, config.json, model_summary.txt, checkpoints/, tb/')
  return test_metrics
