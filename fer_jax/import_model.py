"""--mode=import: a workdir that holds a published model, ready for
evaluate, predict and export.

HSEmotion's enet_b0_8_va_mtl (A. Savchenko, Apache-2.0) is timm's
tf_efficientnet_b0_ns with a Linear(1280, 10) classifier: 8 expression
logits in its alphabetical class order (idx_to_class in the hsemotion
package's facial_emotions.py), then valence and arousal, linear (its
training notebook, src/affectnet/train_emotions-pytorch.ipynb in
av-savchenko/face-emotion-recognition, fits them raw with a CCC loss and
the package returns them raw). Its input: 224 px RGB, ImageNet mean and
std. tools/convert_hsemotion.py turns the released pickle into the
.safetensors read here.

The workdir gets a checkpoint (the best, step 0), model_summary.txt,
import.json (where the weights came from) and config.json, last.
"""

import copy
import dataclasses
import datetime
import hashlib
from pathlib import Path

import jax
import ml_collections
import numpy as np
import safetensors

from fer_jax import (checkpoints, config_rules, face_contract, files,
                     inference, models, steps, workdir as workdir_lib)
from fer_jax.config_rules import UsageError
from fer_jax.labels import EXPRESSIONS
from fer_jax.models import pretrained

HSEMOTION_CLASSES = ('Anger', 'Contempt', 'Disgust', 'Fear', 'Happiness',
                     'Neutral', 'Sadness', 'Surprise')
_SYNONYMS = {'Happy': 'Happiness', 'Sad': 'Sadness'}
# fer_jax's class i is HSEmotion's class FROM_HSEMOTION[i].
FROM_HSEMOTION = tuple(HSEMOTION_CLASSES.index(_SYNONYMS.get(name, name))
                       for name in EXPRESSIONS)
ARCHITECTURES = ('tf_efficientnet_b0', 'efficientnet_b0')
IMAGE_SIZE = 224
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
STEP = 0
HEAD_SHAPES = {'classifier.weight': (1280, 10), 'classifier.bias': (10,)}


def _refuse_taken(workdir: Path) -> None:
  taken = [name for name in ('config.json', 'checkpoints', 'metrics.jsonl',
                             'report', workdir_lib.IMPORT_RECORD)
           if (workdir / name).exists()]
  if taken:
    raise UsageError(f'{workdir}: already holds {", ".join(taken)}; import '
                     'into a new --workdir')


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict]:
  """The tensors (NumPy) and metadata of a .safetensors file."""
  if not path.is_file():
    raise UsageError(f'model.init_from: {path} not found')
  if path.suffix != '.safetensors':
    raise UsageError(f'model.init_from: {path} is not .safetensors; convert '
                     'the released .pt with tools/convert_hsemotion.py')
  try:
    with safetensors.safe_open(str(path), 'numpy') as f:
      return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
  except (OSError, safetensors.SafetensorError) as error:
    raise UsageError(f'{path}: unreadable as .safetensors ({error})') from None


def imported_config(config: ml_collections.ConfigDict, architecture: str
                    ) -> ml_collections.ConfigDict:
  """config with HSEmotion's model and input: the run's config.json."""
  config = copy.deepcopy(config)
  config.model.name, config.model.va_activation = architecture, 'none'
  config.model.hidden_size = 0
  config.data.classes = 'affectnet8'  # HSEmotion's 8, in fer_jax's order
  config.data.image_size = IMAGE_SIZE
  config.data.mean_rgb, config.data.std_rgb = IMAGENET_MEAN, IMAGENET_STD
  config.data.face_margin = 0.0  # HSEmotion's crop: the detector's box
  probe = copy.deepcopy(config)
  probe.data.layout = 'synthetic'  # data is read at evaluation, not here
  config_rules.check(probe, None, training=False)
  return config


def head_params(weight: np.ndarray, bias: np.ndarray) -> dict:
  """The head's Dense layers from HSEmotion's classifier [10, 1280]: rows
  in fer_jax's class order, then valence and arousal."""
  rows = list(FROM_HSEMOTION)
  return {'expression': {'kernel': weight[rows].T, 'bias': bias[rows]},
          'va': {'kernel': weight[8:].T, 'bias': bias[8:]}}


def imported_state(config: ml_collections.ConfigDict, tensors: dict,
                   path: Path) -> steps.TrainState:
  """A train state shaped as the run's checkpoints (inference.restore's
  template) holding the weights of tensors (a timm state dict), with a
  fresh optimiser state."""
  tensors = {k.replace('classifier.0.', 'classifier.', 1): v
             for k, v in tensors.items()}  # a Sequential(Linear) classifier
  _, tx, shapes = inference.state_shape(config)
  ema = config.train.ema_decay > 0
  variables = {'params': shapes.params, 'batch_stats': shapes.batch_stats}
  fmt, keys = pretrained.backbone_keys(variables, tensors)
  problems = pretrained.mismatches(
      tensors, {k: v.shape for k, (_, _, v) in keys.items()} | HEAD_SHAPES,
      skip=())
  if problems:
    raise UsageError(f"{path}: does not match HSEmotion's EfficientNet-B0 "
                     f'with a Linear(1280, 10) classifier (read as {fmt} '
                     'names).\n  ' + '\n  '.join(problems))
  variables = pretrained.with_backbone(variables, tensors, keys)
  params = {**variables['params'], 'head': head_params(
      tensors['classifier.weight'], tensors['classifier.bias'])}
  batch_stats = variables['batch_stats']
  return shapes.replace(
      step=np.zeros((), np.int32), params=params, batch_stats=batch_stats,
      opt_state=tx.init(params), rng=jax.random.PRNGKey(config.train.seed),
      ema_params=params if ema else None,
      ema_batch_stats=batch_stats if ema else None)


def _sha256(path: Path) -> str:
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def import_model(config: ml_collections.ConfigDict, workdir: str | Path
                 ) -> Path:
  """Writes a workdir holding the model of config.model.init_from (an
  HSEmotion .safetensors) as its best checkpoint; returns the workdir."""
  workdir = Path(workdir)
  if not config.model.init_from:
    raise UsageError('model.init_from: empty; --mode=import reads '
                     '--config.model.init_from=FILE.safetensors')
  path = Path(config.model.init_from)
  _refuse_taken(workdir)
  tensors, metadata = read_safetensors(path)
  # Their variables are the same; tools/convert_hsemotion.py records which.
  architecture = metadata.get('architecture', config.model.name)
  if architecture not in ARCHITECTURES:
    raise UsageError(f'model.name: {architecture!r} is not one of '
                     f'{", ".join(ARCHITECTURES)}, and {path} records no '
                     "architecture (HSEmotion's is tf_efficientnet_b0)")
  config = imported_config(config, architecture)
  train_state = imported_state(config, tensors, path)

  # Decided: from here on the import writes.
  manager = checkpoints.create_manager(workdir, config)
  try:
    meta = dataclasses.asdict(checkpoints.Progress(step=STEP,
                                                     best_step=STEP))
    checkpoints.save(manager, STEP, train_state, meta, {}, None)
    manager.wait_until_finished()
  finally:
    manager.close()
  files.write_text(workdir / 'model_summary.txt', models.parameter_summary(
      {'params': train_state.params,
       'batch_stats': train_state.batch_stats}) + '\n')
  files.write_json(workdir / workdir_lib.IMPORT_RECORD, {
      'source': str(path.resolve()), 'sha256': _sha256(path),
      'conversion': metadata, 'architecture': architecture,
      'classes': {'hsemotion': list(HSEMOTION_CLASSES),
                  'fer_jax': list(EXPRESSIONS),
                  'fer_jax_from_hsemotion': list(FROM_HSEMOTION)},
      'valence_arousal': 'classifier rows 8 (valence) and 9 (arousal), '
                         'linear: model.va_activation none',
      'checkpoint_step': STEP, 'training_rules': steps.TRAINING_RULES,
      'date': datetime.datetime.now().astimezone().isoformat(
          timespec='seconds')})
  face_contract.write(workdir, face_contract.imported(
      config, "HSEmotion's published crop: the face detector's box, no "
      'margin, RGB, 224 px, ImageNet normalisation'))
  files.write_json(workdir / 'config.json', config_rules.as_json(config))
  print(f'Imported {path} ({architecture}) into {workdir}: evaluate, '
        'predict and export read it as a trained run')
  return workdir
