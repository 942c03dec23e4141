"""A config checked at the door, compared with a run's saved one, and merged.

Every mode checks its config here before it reads data or writes a file;
a resumed run, an ablation and an evaluation compare configs here, with
one list of the fields that may differ.
"""

import json
import math
from pathlib import Path
from typing import Any

import ml_collections

from fer_jax import detect, labels, losses, metrics, models
from fer_jax.data import LAYOUTS
from fer_jax.data.fer2013 import FERPLUS_LABELS
from fer_jax.errors import UsageError

# Fields that change how long a run trains, or where and how fast it reads
# and writes, not what a checkpoint means: a resumed run may change them
# (they go to the workdir's change log) and inference takes them from the
# command line.
HOW_FIELDS = (
    'train.num_epochs', 'train.eval_batch_size',
    'train.checkpoint_every_steps', 'train.keep_checkpoints',
    'train.log_every_steps', 'train.num_sample_images', 'model.kernels',
    'data.root', 'data.on_error', 'data.check_images', 'data.num_workers',
    'data.num_threads', 'data.prefetch_batches', 'data.index_processes',
    'data.cache_decoded_mb', 'data.face_calibration_samples',
    'data.index_cache_dir', 'data.synthetic.num_processes',
    'data.synthetic.cache_dir', 'data.synthetic.regenerate',
    'predict.detector', 'predict.min_score', 'predict.min_face_size',
    'predict.video_every', 'predict.smoothing', 'predict.annotate',
    'predict.save_crops')
# Inference also takes which copy of the data it reads, and its test-time
# augmentation, from the command line.
INFERENCE_FIELDS = HOW_FIELDS + (
    'data.layout', 'data.train_source', 'data.released_source',
    'data.images_dir', 'eval.tta')
# Predict and export read no data: they take the settings above from the
# command line but every data field from the run (those say how its faces
# were made), and need no data set where it trained.
DEPLOY_FIELDS = tuple(f for f in INFERENCE_FIELDS
                      if not f.startswith('data.'))

# --mode=evaluate scores the run's own data: each data field comes from the
# run but those set explicitly (--config.data.<field>=, fer_jax.evaluate's
# data). An explicit value other than the run's is refused for the fields
# of the face contract (the model is shown faces made as in training, or
# its numbers say nothing about it) and for those of training only.
FACE_FIELDS = ('data.face_margin', 'data.image_size', 'data.mean_rgb',
               'data.std_rgb')
TRAINING_DATA_FIELDS = ('data.sampler', 'data.augment')
# The fields that say which data set is read: another one is scored in
# its own label space.
DATA_SET_FIELDS = ('data.layout', 'data.root', 'data.train_source',
                   'data.released_source', 'data.class_folders')


def check_evaluation_data(field: str, trained: Any, given: Any) -> None:
  """UsageError for an explicit data field that an evaluation cannot take
  (trained: the run's value; values as config.json holds them)."""
  if given == trained:
    return
  if field in FACE_FIELDS:
    raise UsageError(
        f'{field}: {given!r} given, but the model was trained on faces made '
        f'with {trained!r}; an evaluation makes faces as its training did '
        f'({", ".join(FACE_FIELDS)} come from the run)')
  if any(field == f or field.startswith(f'{f}.')
         for f in TRAINING_DATA_FIELDS):
    raise UsageError(f'{field}: a training setting, which an evaluation '
                     'never reads (it reads each image once, unaugmented)')
  if field == 'data.synthetic.regenerate' and given:
    raise UsageError(f"{field}: an evaluation reads the run's data set; it "
                     'never draws it again')


# Layouts without valence/arousal labels: every VA metric is None.
NO_VA_LAYOUTS = ('folders', 'rafdb', 'fer2013', 'ferplus')


def as_json(config: ml_collections.ConfigDict) -> dict:
  """A config as its config.json reads back: plain dicts, tuples as lists,
  data.classes as the names of the label space (not '' or a preset; as
  given where they cannot be read, which check() refuses)."""
  tree = json.loads(json.dumps(config.to_dict()))
  if 'classes' in tree.get('data', {}):
    try:
      tree['data']['classes'] = ','.join(labels.run_classes(config))
    except ValueError:  # e.g. class folders not found: named by check()
      pass
  return tree


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def changes(saved: dict, config: ml_collections.ConfigDict) -> dict:
  """{field: (saved value, new value)} where config differs from saved (a
  config.json's content); a field only one of them has is None in the
  other."""
  old, new = flatten(saved), flatten(as_json(config))
  return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
          if old.get(k) != new.get(k)}


def meaning_changes(saved: dict, config: ml_collections.ConfigDict,
                    allowed: tuple[str, ...] = HOW_FIELDS) -> dict:
  """changes() outside `allowed` that both configs have: those that would
  make a checkpoint or a result mean something else. A field only one has
  comes from another version of fer_jax and is not counted."""
  old, new = flatten(saved), flatten(as_json(config))
  return {k: v for k, v in changes(saved, config).items()
          if k not in allowed and k in old and k in new}


def describe(changed: dict) -> str:
  """'field saved -> new, ...' of changes()."""
  return ', '.join(f'{k} {old!r} -> {new!r}' for k, (old, new)
                   in changed.items())


def _set(config: ml_collections.ConfigDict, field: str, value) -> None:
  *parents, name = field.split('.')
  node = config
  for part in parents:
    node = node[part]
  if isinstance(node[name], tuple) and isinstance(value, list):
    value = tuple(value)
  node[name] = value


def merged(saved: dict, config: ml_collections.ConfigDict,
           keep: tuple[str, ...] = INFERENCE_FIELDS
           ) -> ml_collections.ConfigDict:
  """config with every field of saved (a config.json's content) but those
  in keep; fields saved lacks (an older run) keep config's value."""
  config = config.copy_and_resolve_references()
  have = flatten(as_json(config))
  for field, value in flatten(saved).items():
    if field in have and field not in keep:
      _set(config, field, value)
  return config


def _value(config: ml_collections.ConfigDict, field: str) -> Any:
  node = config
  for part in field.split('.'):
    node = node[part]
  return node


def _choice(config, field: str, choices) -> None:
  value = _value(config, field)
  if value not in choices:
    raise UsageError(f'{field}: {value!r} is not one of '
                     f"{', '.join(map(repr, choices))}")


def _number(config, field: str, low: float, high: float = math.inf, *,
            integer: bool = False, open_low: bool = False,
            open_high: bool = False) -> None:
  """field's value is a number (an int if integer) in the interval."""
  value = _value(config, field)
  kind = int if integer else (int, float)
  inside = (isinstance(value, kind) and not isinstance(value, bool) and
            (low < value if open_low else low <= value) and
            (value < high if open_high else value <= high))
  if not inside:
    interval = (f"{'(' if open_low else '['}{low:g}, {high:g}"
                f"{')' if open_high or high == math.inf else ']'}")
    kind = 'an integer' if integer else 'a number'
    raise UsageError(f'{field}: {value!r} is not {kind} in {interval}')


def _pair(config, field: str, low: float, high: float) -> None:
  """field is (a, b) with low < a <= b <= high."""
  value = _value(config, field)
  if not (isinstance(value, (tuple, list)) and len(value) == 2 and
          all(isinstance(v, (int, float)) for v in value) and
          low < value[0] <= value[1] <= high):
    raise UsageError(f'{field}: {value!r} is not a pair (a, b) with '
                     f'{low:g} < a <= b <= {high:g}')


def _divisible(config, field: str, num_devices: int) -> None:
  value = _value(config, field)
  if value % num_devices:
    raise UsageError(f'{field}: {value} is not divisible by the '
                     f'{num_devices} devices')


def best_metric_names() -> set[str]:
  """The metrics.jsonl fields that train.best_metric may name."""
  loss_keys = {'loss', 'ce_loss', 'va_loss', 'va_mse', 'va_ccc_loss'}
  report = metrics.compute_metrics([0, 1], [0, 1], [[0, 0], [1, 1]],
                                   [[0, 0], [1, 1]], [True, True])
  scalars = {k for k, v in report.items() if isinstance(v, (int, float))}
  return ({f'train_{k}' for k in loss_keys | {'accuracy'}} |
          {f'val_{k}' for k in loss_keys | scalars})


def check(config: ml_collections.ConfigDict, num_devices: int | None,
          training: bool = True, reads_data: bool = True) -> None:
  """Raises UsageError naming the first field with a wrong type, range or
  choice, or that breaks a rule between fields.

  num_devices: what the batch sizes must divide (None: not checked here).
  training False: a trained run's config, for inference on devices of
  their own (its training batch need not divide them). reads_data False:
  a config that reads no data (predict, export): data.root need not be.
  """
  data, train = config.data, config.train
  _choice(config, 'model.name', sorted(models.BACKBONES))
  _choice(config, 'model.dtype', sorted(models.DTYPES))
  _choice(config, 'model.kernels', ('auto', 'cpu', 'library'))
  _choice(config, 'model.va_activation', ('tanh', 'none'))
  _number(config, 'model.dropout_rate', 0, 1, open_high=True)
  _number(config, 'model.hidden_size', 0, integer=True)

  _choice(config, 'data.layout', LAYOUTS)
  if 'classes' in data:  # not in runs' configs before it
    try:
      labels.run_classes(config)
    except ValueError as e:
      raise UsageError(str(e)) from None
    _choice(config, 'data.rafdb_images', ('aligned', 'original'))
    _choice(config, 'data.ferplus_labels', FERPLUS_LABELS)
    if losses.is_multi_target(data) and train.label_smoothing:
      # FERPlus's multi-target loss takes the best kept class, not a
      # distribution a smoothing could spread.
      raise UsageError(f'train.label_smoothing: {train.label_smoothing} '
                       "does not apply to data.ferplus_labels="
                       "'multi_target'; set it to 0")
  on_disk = reads_data and data.layout != 'synthetic'
  if on_disk and not data.root:
    raise UsageError('data.root: empty; point it at the data set '
                     '(--config.data.root=PATH)')
  if on_disk and not Path(data.root).is_dir():
    raise UsageError(f'data.root: {data.root} is not a folder')
  _number(config, 'data.image_size', 16, integer=True)
  _choice(config, 'data.on_error', ('raise', 'skip'))
  _choice(config, 'data.validation', ('holdout', 'released'))
  _number(config, 'data.val_fraction', 0, 1, open_low=True, open_high=True)
  _number(config, 'data.split_seed', 0, integer=True)
  _choice(config, 'data.sampler', ('uniform', 'balanced'))
  _number(config, 'data.face_margin', 0)
  _number(config, 'data.face_calibration_samples', 0, integer=True)
  for field in ('data.num_workers', 'data.prefetch_batches',
                'data.index_processes'):
    _number(config, field, 0, integer=True)
  if 'cache_decoded_mb' in config.data:  # not in runs' configs before it
    _number(config, 'data.cache_decoded_mb', 0, integer=True)
  _number(config, 'data.num_threads', 1, integer=True)
  _pair(config, 'data.augment.crop_scale', 0, 1)
  _pair(config, 'data.augment.crop_ratio', 0, math.inf)
  _number(config, 'data.augment.rotation_degrees', 0, 180)
  for field in ('brightness', 'contrast', 'saturation', 'erasing_prob'):
    _number(config, f'data.augment.{field}', 0, 1)
  _pair(config, 'data.augment.erasing_scale', 0, 1)
  _pair(config, 'data.augment.erasing_ratio', 0, math.inf)
  if data.layout == 'synthetic':
    _number(config, 'data.synthetic.num_train', 1, integer=True)
    _number(config, 'data.synthetic.num_val', 1, integer=True)
    _number(config, 'data.synthetic.va_missing_fraction', 0, 1,
            open_high=True)
  _choice(config, 'eval.tta', ('none', 'flip'))
  _choice(config, 'predict.detector', detect.DETECTORS)
  _number(config, 'predict.min_score', 0, 1, open_low=True, open_high=True)
  _number(config, 'predict.min_face_size', 0)
  _number(config, 'predict.video_every', 1, integer=True)
  _number(config, 'predict.smoothing', 0, 1, open_high=True)
  _choice(config, 'predict.annotate', (False, True))
  _choice(config, 'predict.save_crops', (False, True))

  _number(config, 'train.seed', 0, integer=True)
  _number(config, 'train.num_epochs', 1, integer=True)
  for field in ('train.batch_size', 'train.eval_batch_size'):
    _number(config, field, 1, integer=True)
    if num_devices and (training or field == 'train.eval_batch_size'):
      _divisible(config, field, num_devices)
  _choice(config, 'train.optimizer', ('adamw', 'sgd'))
  _number(config, 'train.learning_rate', 0, open_low=True)
  _number(config, 'train.momentum', 0, 1, open_high=True)
  _number(config, 'train.weight_decay', 0)
  _number(config, 'train.warmup_epochs', 0)
  _choice(config, 'train.schedule', ('cosine', 'step', 'constant'))
  epochs = train.step_decay_epochs
  if not (isinstance(epochs, (tuple, list)) and all(
      isinstance(e, (int, float)) and not isinstance(e, bool) and e > 0
      for e in epochs)):
    raise UsageError(f'train.step_decay_epochs: {epochs!r} is not a tuple '
                     'of epochs (numbers > 0)')
  if train.schedule == 'step' and any(
      e <= train.warmup_epochs for e in train.step_decay_epochs):
    raise UsageError(f'train.step_decay_epochs: {train.step_decay_epochs} '
                     'must all come after train.warmup_epochs '
                     f'({train.warmup_epochs})')
  _number(config, 'train.step_decay_factor', 0, open_low=True)
  for field in ('grad_clip_norm', 'sam_rho', 'freeze_backbone_epochs',
                'va_loss_weight'):
    _number(config, f'train.{field}', 0)
  _number(config, 'train.ema_decay', 0, 1, open_high=True)
  _number(config, 'train.label_smoothing', 0, 1, open_high=True)
  _choice(config, 'train.class_weights', losses.CLASS_WEIGHTS)
  _number(config, 'train.class_weight_beta', 0, 1, open_high=True)
  _choice(config, 'train.va_loss', losses.VA_LOSSES)
  _choice(config, 'train.best_metric', sorted(best_metric_names()))
  if data.layout in NO_VA_LAYOUTS and any(
      k in train.best_metric for k in ('valence', 'arousal', 'va_')):
    raise UsageError(f'train.best_metric: {train.best_metric!r} needs '
                     f"valence/arousal labels, which data.layout "
                     f"{data.layout!r} has not")
  _choice(config, 'train.best_mode', ('max', 'min'))
  for field in ('early_stopping_patience', 'checkpoint_every_steps',
                'num_sample_images'):
    _number(config, f'train.{field}', 0, integer=True)
  _number(config, 'train.keep_checkpoints', 1, integer=True)
  _number(config, 'train.log_every_steps', 1, integer=True)
