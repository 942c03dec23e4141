"""--mode=evaluate: a checkpoint on one split, reported beside the record.

The run's own data is scored: every data field comes from the run but
those set explicitly (inference.evaluation_config). Another data set is
scored over the classes it shares with the model, matched by name.
The report goes to report/eval/<split>-step<N>[-flip]/, or, for other data
or classes, report/eval/<split>-<data set>-<K>classes-step<N>[-flip]/ (with
.2, .3, ... when evaluated again): training's own report is never touched.
"""

import re
from pathlib import Path

import jax
import ml_collections
from absl import logging

from fer_jax import (config_rules, data as data_lib, distributed,
                     face_contract, files, inference, labels, losses,
                     reporting, workdir as workdir_lib)
from fer_jax.config_rules import UsageError

# Layouts of any data: their root's folder name says which set it is.
_NAMED_BY_ROOT = ('npy', 'csv', 'folders')


def data_set_name(data: ml_collections.ConfigDict) -> str:
  """The data set as an output folder names it: its layout ('rafdb'), with
  its root's folder name for the layouts of any data ('folders-mine')."""
  if data.layout not in _NAMED_BY_ROOT or not data.root:
    return data.layout
  name = Path(data.root).resolve().name
  return f"{data.layout}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}"


def _class_weights(config: ml_collections.ConfigDict, workdir: Path,
                   data_report: dict):
  """The class weights of the loss as the run trained it: from its own
  record's train counts (this data's where the run has none)."""
  path = workdir / 'data_report.json'
  record = workdir_lib.read_json(path) if path.exists() else data_report
  return losses.configured_class_weights(config.train,
                                         record['train']['class_counts'])


def _refuse_unknown(workdir: Path, classes: tuple[str, ...],
                    model_classes: tuple[str, ...]) -> None:
  """UsageError naming a class of the data that the model lacks."""
  unknown = [c for c in classes if c not in model_classes]
  if unknown:
    raise UsageError(f'{workdir}: the model has no class {unknown[0]!r} of '
                     f'this data set (its classes: {", ".join(classes)}; the '
                     f'model\'s: {", ".join(model_classes)}); set '
                     'data.classes (--config.data.classes) to those it '
                     'shares')


def evaluate(config: ml_collections.ConfigDict | None, workdir: str,
             split: str, checkpoint_step: int | None = None,
             data: dict | None = None) -> dict:
  """Evaluates the best (or given) checkpoint of workdir on one split.

  config: the inference settings (train.eval_batch_size, eval.tta; None:
  the run's); its data section is not read. data: the data fields set
  explicitly, by name below data. ({'layout': 'rafdb', 'root': PATH}); the
  others are the run's.
  """
  workdir = Path(workdir)
  if split not in data_lib.SPLIT_NAMES:
    raise UsageError(f'--split: {split!r} is not one of '
                     f'{data_lib.SPLIT_NAMES}')
  data = dict(data or {})
  config, changed = inference.evaluation_config(config, workdir, data)
  config_rules.check(config, jax.device_count(), training=False)
  model_classes = labels.run_classes(config)
  classes = inference.data_classes(config, data, changed)
  _refuse_unknown(workdir, classes, model_classes)
  if classes != model_classes:
    changed['data.classes'] = (','.join(model_classes), ','.join(classes))
  for field, (trained, now) in changed.items():  # explicit, and said so
    logging.warning('%s: %s is %r here, %r in training', workdir, field, now,
                    trained)
  data_config = config.copy_and_resolve_references()
  data_config.data.classes = ','.join(classes)
  splits, data_report = data_lib.load_splits_all_processes(data_config)
  weights = _class_weights(config, workdir, data_report)
  state, p_eval, step = inference.restore(config, workdir, checkpoint_step,
                                          weights)
  other = any(f in changed for f in config_rules.DATA_SET_FIELDS)
  grey = other and face_contract.read(workdir, config)['colour'] == 'grey'
  if grey:
    logging.info('The model was trained on grey faces (its face contract): '
                 'this data set\'s faces are turned grey')
  result, predictions = inference.evaluate_records(
      p_eval, state, splits[split], config, classes, grey)
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
  name = data_set_name(config.data)
  result.update(checkpoint_step=step, split=split, tta=config.eval.tta,
                data_set=name, data_root=data_report['root'],
                data_differs_from_training={
                    k: list(v) for k, v in changed.items()},
                faces_turned_grey=grey,
                split_differs_from_training=differs)
  writer = reporting.Writer(workdir, distributed.is_primary())
  if writer.active:
    what = split if not (other or classes != model_classes) else (
        f'{split}-{name}-{len(classes)}classes')
    folder = workdir_lib.output_dir(
        workdir, 'eval', inference.output_name(what, step, config))
    files.write_json(folder / 'data_report.json', data_report)
    reporting.write_split_report(folder, split, result, predictions,
                                 splits[split], config)
    writer.say(f'Data: {name} at {data_report["root"]}, {len(classes)} '
               f'classes ({", ".join(classes)})' + ''.join(
                   f'; {k} {v[1]!r} (training: {v[0]!r})'
                   for k, v in changed.items()) +
               ('; faces turned grey, as the model trained on them'
                if grey else ''))
    writer.say(reporting.format_summary(result, split))
    writer.say(f'Report: {folder}')
  return result
