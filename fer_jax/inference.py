"""A trained model at work: its config, a checkpoint restored for
evaluation, and the predictions and metrics of a split."""

import dataclasses
from pathlib import Path
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from fer_jax import (checkpoints, config_rules, distributed, labels, losses,
                     metrics, models, steps, workdir as workdir_lib)
from fer_jax.config_rules import UsageError
from fer_jax.data import pipeline
from fer_jax.data.index import Records


def trained_config(config: ml_collections.ConfigDict, workdir: Path
                   ) -> ml_collections.ConfigDict:
  """config with the settings that the run in workdir trained with.

  From the run's config.json: the model, the training section (loss terms
  and optimiser, so the checkpoint restores and losses mean the same), the
  input (image size, face margin, normalisation) and how the splits were
  drawn. From config (the command line): where the data is and how it is
  read, the evaluation batch size and test-time augmentation
  (config_rules.INFERENCE_FIELDS).
  """
  path = Path(workdir) / 'config.json'
  if not path.exists():
    raise UsageError(f'{path}: not found; is {workdir} a training workdir?')
  saved = workdir_lib.read_json(path)
  config = config_rules.merged(saved, config)
  if 'classes' not in saved.get('data', {}):  # from before data.classes
    config.data.classes = 'affectnet8'
  config.data.synthetic.regenerate = False
  return config


def data_classes(command_line: ml_collections.ConfigDict, workdir: Path
                 ) -> tuple[str, ...] | None:
  """The label space of the data that an evaluation of workdir's run
  reads, where it is not the run's: data.classes given on the command
  line, or the layout's own where the command line's layout has another
  label space than the run's (a cross-dataset evaluation). None: the
  run's."""
  saved = workdir_lib.read_json(Path(workdir) / 'config.json')['data']
  layout = command_line.data.layout
  try:
    if command_line.data.get('classes', '').strip():
      return labels.parse_classes(command_line.data.classes, layout)
  except ValueError as e:
    raise UsageError(str(e)) from None
  if labels.LAYOUT_PRESETS.get(layout) != labels.LAYOUT_PRESETS.get(
      saved['layout']):
    return labels.parse_classes('', layout)
  return None


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


def predict_records(p_eval: Callable, state: steps.TrainState,
                    records: Records, config: ml_collections.ConfigDict
                    ) -> dict:
  """Probabilities [N, K], valence/arousal [N, 2] and loss sums of a split.

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
                     records: Records, config: ml_collections.ConfigDict,
                     classes: tuple[str, ...] | None = None
                     ) -> tuple[dict, dict]:
  """All report metrics of a split (with its losses), and the predictions.

  classes: the label space of records, if not the run's (a cross-dataset
  evaluation): each must be one of the run's, matched by name. The model's
  other classes are left out of the argmax, and the probabilities are
  renormalised over classes; the losses stay the model's own.
  """
  model_classes = labels.run_classes(config)
  classes = classes or model_classes
  columns = np.array([model_classes.index(c) for c in classes])
  out = predict_records(p_eval, state, dataclasses.replace(
      records, labels=columns[records.labels].astype(np.int32)), config)
  if classes != model_classes:
    probs = out['probs'][:, columns]
    out['probs'] = probs / probs.sum(1, keepdims=True)
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
