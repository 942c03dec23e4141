"""A trained model at work: its config, a checkpoint restored for
evaluation, and the predictions and metrics of a split."""

import dataclasses
import json
from pathlib import Path
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from fer_jax import (checkpoints, config_rules, distributed, face_contract,
                     files, labels, losses, metrics, models, steps,
                     workdir as workdir_lib)
from fer_jax.config_rules import UsageError
from fer_jax.configs import default as default_config
from fer_jax.data import pipeline
from fer_jax.data.index import Records


def trained_config(config: ml_collections.ConfigDict, workdir: Path,
                   keep: tuple[str, ...] = config_rules.INFERENCE_FIELDS
                   ) -> ml_collections.ConfigDict:
  """config with the settings that the run in workdir trained with.

  From the run's config.json: the model, the training section (loss terms
  and optimiser, so the checkpoint restores and losses mean the same), the
  input (image size, face margin, normalisation) and how the splits were
  drawn. From config (the command line): the fields of keep; by default
  where the data is and how it is read, the evaluation batch size and
  test-time augmentation (config_rules.INFERENCE_FIELDS).
  """
  path = Path(workdir) / 'config.json'
  if not path.exists():
    raise UsageError(f'{path}: not found; is {workdir} a training workdir?')
  saved = workdir_lib.read_json(path)
  config = config_rules.merged(saved, config, keep)
  if 'classes' not in saved.get('data', {}):  # from before data.classes
    config.data.classes = 'affectnet8'
  config.data.synthetic.regenerate = False
  return config


def deploy_config(config: ml_collections.ConfigDict, workdir: Path
                  ) -> ml_collections.ConfigDict:
  """The config that predict and export run workdir's model with: the
  run's, data fields included, and config's inference settings
  (config_rules.DEPLOY_FIELDS); it reads no data."""
  return trained_config(config, workdir, config_rules.DEPLOY_FIELDS)


def run_data(workdir: Path) -> dict:
  """The data fields the run in workdir trained on, flat ('data.root'):
  its config.json's, with the changes its resumed sessions logged (a data
  set moved to another root, say)."""
  workdir = Path(workdir)
  saved = workdir_lib.read_json(workdir / 'config.json')
  fields = config_rules.flatten({'data': saved['data']})
  log = workdir / workdir_lib.CHANGE_LOG
  for entry in files.read_jsonl(log) if log.exists() else []:
    fields.update({k: new for k, (_, new) in entry['changes'].items()
                   if k in fields})
  return fields


def _plain(value):
  """A value as config.json holds it (tuples as lists)."""
  return json.loads(json.dumps(value))


def evaluation_config(config: ml_collections.ConfigDict | None,
                      workdir: Path, data: dict
                      ) -> tuple[ml_collections.ConfigDict, dict]:
  """The config of an evaluation of workdir's run, and {data field:
  (the run's value, this evaluation's)} where they differ.

  Model, training and every data field come from the run (run_data), but
  the data fields that `data` sets ({name below data.: value}, e.g.
  {'layout': 'rafdb', 'root': PATH}); config_rules.check_evaluation_data
  refuses some. data['classes'] is the data set's label space, not the
  model's (data_classes). config gives the inference settings
  (train.eval_batch_size, eval.tta, predict) and no data; None: the run's.
  """
  given = config
  config = trained_config(
      default_config.get_config() if given is None else given, workdir)
  if given is None:  # the run's inference settings too
    config = config_rules.merged(
        workdir_lib.read_json(Path(workdir) / 'config.json'), config,
        keep=())
  trained = run_data(workdir)
  config = config_rules.merged(trained, config, keep=())
  have = config_rules.flatten(config_rules.as_json(config))
  changed = {}
  for name, value in (data or {}).items():
    field = f'data.{name}'
    if name == 'classes':
      continue
    if field not in have:
      raise UsageError(f'{field}: not a data field of this run\'s config')
    value = _plain(value)
    config_rules.check_evaluation_data(field, have[field], value)
    if value != have[field]:
      changed[field] = (have[field], value)
      config = config_rules.merged({field: value}, config, keep=())
  config.data.synthetic.regenerate = False
  _note_unread(given, trained, data or {})
  return config, changed


def _note_unread(config: ml_collections.ConfigDict | None, trained: dict,
                 data: dict) -> None:
  """Logs the data fields of config (the command line's) that differ from
  the run's and were not given explicitly: never read, and said so."""
  if config is None:
    return
  flat = config_rules.flatten(config_rules.as_json(config))
  unread = sorted(k for k, v in flat.items() if k in trained and
                  trained[k] != v and k != 'data.classes' and
                  k.split('.', 1)[1] not in data)
  if unread:
    logging.info('The run\'s own data is scored: the command line\'s '
                 'config is not read for data (%s differ from the run\'s); '
                 '--config.data.<field>=... sets one', ', '.join(unread))


def data_classes(config: ml_collections.ConfigDict, data: dict,
                 changed: dict) -> tuple[str, ...]:
  """The label space of the data an evaluation reads (config and changed:
  evaluation_config's): data['classes'] where given; the run's where the
  data set is the run's; else the data set's own (its layout's preset, or
  the classes its class folders have)."""
  spec = (data or {}).get('classes')
  other_set = any(f in changed for f in config_rules.DATA_SET_FIELDS)
  try:
    if spec is not None and str(spec).strip():
      return labels.parse_classes(spec, config.data.layout)
    if spec is not None or other_set:
      own = config.copy_and_resolve_references()
      own.data.classes = ''
      return labels.run_classes(own)
  except ValueError as e:
    raise UsageError(str(e)) from None
  return labels.run_classes(config)


def _require_checkpoints(workdir: Path) -> None:
  """UsageError when workdir has no checkpoints/."""
  if not (Path(workdir) / 'checkpoints').exists():
    raise UsageError(f"{Path(workdir) / 'checkpoints'}: not found; train "
                     'first (python main.py --workdir=...)')


def find_step(config: ml_collections.ConfigDict, workdir: Path,
              checkpoint_step: int | None) -> int:
  """checkpoint_step if the run keeps it (UsageError if not), or None: the
  best step."""
  _require_checkpoints(workdir)
  manager = checkpoints.create_manager(workdir, config, read_only=True)
  try:
    return checkpoints.checkpoint_step(manager, checkpoint_step,
                                       config.train)
  finally:
    manager.close()


def state_shape(config: ml_collections.ConfigDict):
  """The model, the optimiser and the train state's shapes (no values)
  that a run of config trains and checkpoints."""
  model = models.create_model(config.model, axis_name=steps.AXIS,
                              num_classes=len(labels.run_classes(config)))
  # Shaped as training's: the state's structure does not depend on the
  # schedule's values (a real schedule at one step per epoch could even
  # refuse step boundaries that training's epochs allow).
  tx = steps.create_optimizer(config.train, lambda count: 0.0)
  # Shapes only: compiling the initialisers cost 30-50 s for EfficientNet.
  template = jax.eval_shape(lambda: steps.create_train_state(
      model, tx, config.data.image_size, config.train.seed,
      ema=config.train.ema_decay > 0))
  return model, tx, template


def _restore(config: ml_collections.ConfigDict, workdir: Path,
             checkpoint_step: int | None, template: steps.TrainState
             ) -> tuple[steps.TrainState, int, dict]:
  manager = checkpoints.create_manager(workdir, config, read_only=True)
  try:
    step = checkpoints.checkpoint_step(manager, checkpoint_step,
                                       config.train)
    rules = steps.rules_of(checkpoints.read_meta(manager, step))
    if rules != steps.TRAINING_RULES:  # the model's outputs may differ a bit
      logging.warning('%s/%d was trained under training rules %d; this '
                      'fer_jax has rules %d (fer_jax/steps.py)',
                      manager.directory, step, rules, steps.TRAINING_RULES)
    state, meta, _ = checkpoints.restore(manager, step, template)
  finally:
    manager.close()
  logging.info('Restored the checkpoint of step %d from %s', step,
               manager.directory)
  return state, step, meta


def restore_state(config: ml_collections.ConfigDict, workdir: Path,
                  checkpoint_step: int | None
                  ) -> tuple[steps.TrainState, int, dict]:
  """One copy of a checkpoint's train state (on the host), its step and
  its meta item.

  checkpoint_step: None for the best. Warns when the checkpoint was
  trained under other training rules. model.init_from is not read: the
  checkpoint holds every weight.
  """
  _require_checkpoints(workdir)
  return _restore(config, workdir, checkpoint_step, state_shape(config)[2])


def restore(config: ml_collections.ConfigDict, workdir: Path,
            checkpoint_step: int | None,
            weights: np.ndarray | None = None):
  """The replicated state of a checkpoint, the pmapped eval step, the step.

  checkpoint_step: None for the best. weights: the class weights of the
  loss that evaluation reports. As restore_state, it warns about other
  training rules and does not read model.init_from.
  """
  _require_checkpoints(workdir)
  model, tx, template = state_shape(config)
  state, step, _ = _restore(config, workdir, checkpoint_step, template)
  _, p_eval = steps.pmap_steps(model, tx, config, weights)
  return steps.replicate(state), p_eval, step


def shared_probabilities(logits: np.ndarray, columns: np.ndarray
                         ) -> np.ndarray:
  """Probabilities [N, len(columns)] over the model's classes at columns
  only: a softmax of their logits alone.

  From the logits, shifted by their maximum, not by renormalising the
  model's probabilities: where a left-out class takes all the mass, the
  others' probabilities underflow to 0 and 0 / 0 would be NaN.
  """
  shared = np.asarray(logits, np.float64)[:, columns]
  shared = np.exp(shared - shared.max(axis=1, keepdims=True))
  return (shared / shared.sum(axis=1, keepdims=True)).astype(np.float32)


def predict_records(p_eval: Callable, state: steps.TrainState,
                    records: Records, config: ml_collections.ConfigDict,
                    grey: bool = False) -> dict:
  """Probabilities and logits [N, K], valence/arousal [N, 2] and loss sums
  of a split; grey: its faces turned grey first (face_contract.to_grey).

  Outputs stream to the host batch by batch, so no split's logits are held
  on the device. With several processes each evaluates its share and all
  receive every prediction (the sums are already over all devices).
  """
  rows, sums = {}, None
  for batch in pipeline.eval_batches(records, config, jax.local_device_count(),
                                     jax.process_index(), jax.process_count()):
    if grey:
      batch['image'] = face_contract.to_grey(batch['image'])
    out = steps.local_values(p_eval(state, batch))
    keep = batch['mask'].reshape(-1)
    for key in ('probs', 'logits', 'va'):
      rows.setdefault(key, []).append(
          out[key].reshape(-1, out[key].shape[-1])[keep])
    batch_sums = jax.tree.map(lambda x: np.asarray(x[0], np.float64),
                              out['sums'])
    sums = batch_sums if sums is None else jax.tree.map(
        np.add, sums, batch_sums)
  gathered = {key: distributed.gather_rows(np.concatenate(values),
                                           len(records))
              for key, values in rows.items()}
  return {**gathered, 'sums': sums}


def evaluate_records(p_eval: Callable, state: steps.TrainState,
                     records: Records, config: ml_collections.ConfigDict,
                     classes: tuple[str, ...] | None = None,
                     grey: bool = False) -> tuple[dict, dict]:
  """All report metrics of a split (with its losses), and the predictions.

  classes: the label space of records, if not the run's (a cross-dataset
  evaluation): each must be one of the run's, matched by name. The model's
  other classes are left out of the argmax, and the probabilities are
  those of the softmax over classes' logits (shared_probabilities); the
  losses stay the model's own.
  """
  model_classes = labels.run_classes(config)
  classes = classes or model_classes
  columns = np.array([model_classes.index(c) for c in classes])
  out = predict_records(p_eval, state, dataclasses.replace(
      records, labels=columns[records.labels].astype(np.int32)), config,
                        grey)
  if classes != model_classes:
    out['probs'] = shared_probabilities(out['logits'], columns)
  result = metrics.compute_metrics(records.labels, out['probs'].argmax(-1),
                                   records.va, out['va'], records.va_mask,
                                   classes)
  loss = losses.normalise(out['sums'], config.train.va_loss_weight,
                          config.train.va_loss)
  result.update({k: float(v) for k, v in loss.items() if k != 'accuracy'})
  return result, out


def output_name(what: str, step: int, config: ml_collections.ConfigDict
                ) -> str:
  """'<what>-step<N>', with '-flip' under flip test-time augmentation."""
  return f'{what}-step{step}' + ('-flip' if config.eval.tta == 'flip'
                                 else '')
