"""--mode=evaluate: a checkpoint on one split, reported beside the record.

The report goes to report/eval/<split>-step<N>[-flip]/ (with .2, .3, ...
when evaluated again): training's own report is never touched.
"""

from pathlib import Path

import jax
import ml_collections
from absl import logging

from fer_jax import (config_rules, data, distributed, files, inference,
                     labels, losses, reporting, workdir as workdir_lib)
from fer_jax.config_rules import UsageError


def evaluate(config: ml_collections.ConfigDict, workdir: str, split: str,
             checkpoint_step: int | None = None) -> dict:
  """Evaluates the best (or given) checkpoint of workdir on one split."""
  workdir = Path(workdir)
  if split not in data.SPLIT_NAMES:
    raise UsageError(f'--split: {split!r} is not one of {data.SPLIT_NAMES}')
  command_line = config
  config = inference.trained_config(config, workdir)
  config_rules.check(config, jax.device_count(), training=False)
  model_classes = labels.run_classes(config)
  classes = inference.data_classes(command_line, workdir) or model_classes
  unknown = [c for c in classes if c not in model_classes]
  if unknown:
    raise UsageError(f'{workdir}: the model has no class {unknown[0]!r} of '
                     f'this data set (its classes: {", ".join(classes)}; the '
                     f'model\'s: {", ".join(model_classes)}); set '
                     '--config.data.classes to those it shares')
  data_config = config.copy_and_resolve_references()
  data_config.data.classes = ','.join(classes)
  splits, data_report = data.load_splits_all_processes(data_config)
  # The loss as the run trained it: class weights from its own record.
  record = (data_report if classes == model_classes else
            workdir_lib.read_json(workdir / 'data_report.json'))
  counts = record['train']['class_counts']
  weights = losses.configured_class_weights(config.train, counts)
  state, p_eval, step = inference.restore(config, workdir, checkpoint_step,
                                          weights)
  result, predictions = inference.evaluate_records(
      p_eval, state, splits[split], config, classes)
  if classes != model_classes:  # stated in the report
    result.update(model_classes=list(model_classes), class_mapping={
        c: model_classes.index(c) for c in classes}, left_out_of_argmax=[
            c for c in model_classes if c not in classes])
    logging.info('Cross-dataset: the data set\'s classes %s are the model\'s '
                 'logits %s; left out of the argmax: %s', classes,
                 result['class_mapping'], result['left_out_of_argmax'])
  differs = workdir_lib.split_differences(
      workdir, {split: splits[split]}, data_report['root']).get(split)
  if differs:
    logging.warning('%s: split %r differs from the one training recorded '
                    'in splits.npz: %s', workdir, split, differs)
  result.update(checkpoint_step=step, split=split, tta=config.eval.tta,
                data_root=data_report['root'],
                split_differs_from_training=differs)
  writer = reporting.Writer(workdir, distributed.is_primary())
  if writer.active:
    what = split if classes == model_classes else (
        f'{split}-{data_config.data.layout}-{len(classes)}classes')
    folder = workdir_lib.output_dir(
        workdir, 'eval', inference.output_name(what, step, config))
    files.write_json(folder / 'data_report.json', data_report)
    reporting.write_split_report(folder, split, result, predictions,
                                 splits[split], config)
    writer.say(reporting.format_summary(result, split))
    writer.say(f'Report: {folder}')
  return result
