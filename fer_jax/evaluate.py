"""--mode=evaluate: a checkpoint on one split, reported beside the record.

The report goes to report/eval/<split>-step<N>[-flip]/ (with .2, .3, ...
when evaluated again): training's own report is never touched.
"""

from pathlib import Path

import jax
import ml_collections
from absl import logging

from fer_jax import (config_rules, data, distributed, files, inference,
                     losses, reporting, workdir as workdir_lib)
from fer_jax.config_rules import UsageError


def evaluate(config: ml_collections.ConfigDict, workdir: str, split: str,
             checkpoint_step: int | None = None) -> dict:
  """Evaluates the best (or given) checkpoint of workdir on one split."""
  workdir = Path(workdir)
  if split not in data.SPLIT_NAMES:
    raise UsageError(f'--split: {split!r} is not one of {data.SPLIT_NAMES}')
  config = inference.trained_config(config, workdir)
  config_rules.check(config, jax.device_count(), training=False)
  splits, data_report = data.load_splits_all_processes(config)
  weights = losses.configured_class_weights(
      config.train, data_report['train']['class_counts'])
  state, p_eval, step = inference.restore(config, workdir, checkpoint_step,
                                          weights)
  result, predictions = inference.evaluate_records(p_eval, state,
                                                   splits[split], config)
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
    folder = workdir_lib.output_dir(
        workdir, 'eval', inference.output_name(split, step, config))
    files.write_json(folder / 'data_report.json', data_report)
    reporting.write_split_report(folder, split, result, predictions,
                                 splits[split], config)
    writer.say(reporting.format_summary(result, split))
    writer.say(f'Report: {folder}')
  return result
