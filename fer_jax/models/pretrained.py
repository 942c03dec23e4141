"""Backbone weights from torchvision or timm checkpoints (.pth, .safetensors).

Every Flax variable of the backbone has one name in each checkpoint format:
a kernel is `weight` (OIHW, transposed to HWIO; depthwise kernels alike), a
BatchNorm scale/bias is `weight`/`bias` and its statistics are
`running_mean`/`running_var`. ResNet18's names are the same in torchvision
and timm (`layer2_0/downsample_conv` is `layer2.0.downsample.0`).
EfficientNet-B0's differ: the block `stage2_0/dw_conv` is torchvision's
`features.2.0.block.1.0` and timm's `blocks.1.0.conv_dw`. The classifier
(`fc.*`, `classifier.*`) is not used: the multitask head keeps its own
initialisation (fer_jax/import_model.py reads HSEmotion's classifier into
it, with backbone_keys, mismatches and with_backbone).
"""

import re
from pathlib import Path
from typing import Any

import flax
import numpy as np

from fer_jax.models.efficientnet import STAGES

FORMATS = ('torchvision', 'timm')
CLASSIFIER_PREFIXES = ('fc.', 'classifier.')
IGNORED_SUFFIXES = ('num_batches_tracked',)
LEAF_NAMES = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
              ('params', 'bias'): 'bias',
              ('batch_stats', 'mean'): 'running_mean',
              ('batch_stats', 'var'): 'running_var'}
EFFICIENTNET_ENDS = {  # Flax module: (torchvision, timm)
    'stem_conv': ('features.0.0', 'conv_stem'),
    'stem_bn': ('features.0.1', 'bn1'),
    'head_conv': ('features.8.0', 'conv_head'),
    'head_bn': ('features.8.1', 'bn2')}
# Inside an MBConv block: torchvision's position in `block` (one less
# without the expansion layer) and timm's names with and without it.
EFFICIENTNET_BLOCK = {
    'expand_conv': ((0, '0'), 'conv_pw', None),
    'expand_bn': ((0, '1'), 'bn1', None),
    'dw_conv': ((1, '0'), 'conv_dw', 'conv_dw'),
    'dw_bn': ((1, '1'), 'bn2', 'bn1'),
    'se/reduce': ((2, 'fc1'), 'se.conv_reduce', 'se.conv_reduce'),
    'se/expand': ((2, 'fc2'), 'se.conv_expand', 'se.conv_expand'),
    'project_conv': ((3, '0'), 'conv_pwl', 'conv_pw'),
    'project_bn': ((3, '1'), 'bn3', 'bn2')}


def _resnet_module(modules: tuple[str, ...]) -> str:
  names = []
  for module in modules:
    module = re.sub(r'^(layer\d)_(\d+)$', r'\1.\2', module)
    module = module.replace('downsample_conv', 'downsample.0')
    names.append(module.replace('downsample_bn', 'downsample.1'))
  return '.'.join(names)


def _efficientnet_module(modules: tuple[str, ...]) -> tuple[str, str]:
  if modules[0] in EFFICIENTNET_ENDS:
    return EFFICIENTNET_ENDS[modules[0]]
  stage, block = map(int, re.fullmatch(r'stage(\d)_(\d+)', modules[0]).groups())
  expanded = STAGES[stage - 1][0] != 1
  (position, layer), timm_expanded, timm_plain = EFFICIENTNET_BLOCK[
      '/'.join(modules[1:])]
  position -= 0 if expanded else 1
  return (f'features.{stage}.{block}.block.{position}.{layer}',
          f'blocks.{stage - 1}.{block}.'
          f'{timm_expanded if expanded else timm_plain}')


def checkpoint_names(collection: str, path: tuple[str, ...]) -> dict:
  """{format: state-dict key} of one backbone variable."""
  *modules, leaf = path
  leaf = LEAF_NAMES[(collection, leaf)]
  if modules[0] in EFFICIENTNET_ENDS or modules[0].startswith('stage'):
    modules = _efficientnet_module(tuple(modules))
  else:
    modules = (_resnet_module(tuple(modules)),) * 2
  return {f: f'{m}.{leaf}' for f, m in zip(FORMATS, modules)}


def to_flax(value: np.ndarray) -> np.ndarray:
  """A torch tensor's layout in Flax: OIHW kernels to HWIO, Dense transposed."""
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2:
    return value.T
  return value


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
  """The tensors of a .pth (needs torch) or .safetensors file as NumPy."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f'model.init_from: {path} not found')
  if path.suffix == '.safetensors':
    from safetensors.numpy import load_file
    return load_file(str(path))
  try:
    import torch
  except ImportError:
    raise ImportError(f'{path}: reading .pth needs torch; convert it to '
                      '.safetensors to load without torch') from None
  state = torch.load(path, map_location='cpu', weights_only=True)
  state = state.get('state_dict', state) if isinstance(state, dict) else state
  return {k: v.detach().numpy() for k, v in state.items()}


def backbone_keys(variables: Any, state: dict) -> tuple[str, dict]:
  """(format, {state-dict key: (collection, path, value)}) of every backbone
  variable, named as in the format whose names state holds most of."""
  flat = {c: flax.traverse_util.flatten_dict(variables[c]['backbone'])
          for c in ('params', 'batch_stats')}
  names = {(c, key): checkpoint_names(c, key) for c in flat for key in flat[c]}
  fmt = max(FORMATS, key=lambda f: sum(n[f] in state for n in names.values()))
  return fmt, {n[fmt]: (c, key, flat[c][key]) for (c, key), n in names.items()}


def mismatches(state: dict, shapes: dict[str, tuple],
               skip: tuple[str, ...] = CLASSIFIER_PREFIXES) -> list[str]:
  """The missing, unexpected and mis-shaped keys of state against {key:
  Flax shape}, a line each; [] if it matches. Keys that start with skip,
  and BatchNorm counters, are not unexpected."""
  missing = sorted(set(shapes) - set(state))
  unexpected = sorted(k for k in set(state) - set(shapes)
                      if not k.startswith(skip)
                      and not k.endswith(IGNORED_SUFFIXES))
  misshaped = [f'{name}: checkpoint {tuple(state[name].shape)} (Flax layout '
               f'{to_flax(state[name]).shape}), model {tuple(shape)}'
               for name, shape in sorted(shapes.items())
               if name in state and to_flax(state[name]).shape != tuple(shape)]
  if not (missing or unexpected or misshaped):
    return []
  return [f'missing ({len(missing)}): {missing}',
          f'unexpected ({len(unexpected)}): {unexpected}',
          f'mis-shaped ({len(misshaped)}): {misshaped}']


def with_backbone(variables: Any, state: dict, keys: dict) -> Any:
  """variables with every backbone variable of keys (backbone_keys) read
  from state, in its layout and dtype."""
  variables = flax.core.unfreeze(variables)
  for collection in ('params', 'batch_stats'):
    flat = flax.traverse_util.flatten_dict(variables[collection]['backbone'])
    for name, (c, key, value) in keys.items():
      if c == collection:
        flat[key] = to_flax(state[name]).astype(value.dtype)
    variables[collection]['backbone'] = flax.traverse_util.unflatten_dict(
        flat)
  return variables


def load_pretrained(variables: Any, path: str | Path) -> Any:
  """variables with the backbone (params and BatchNorm statistics) from path.

  Raises ValueError listing every missing, unexpected and mis-shaped key.
  """
  state = read_state_dict(path)
  fmt, keys = backbone_keys(variables, state)
  problems = mismatches(state, {k: v.shape for k, (_, _, v) in keys.items()})
  if problems:
    raise ValueError(f'{path}: does not match the backbone (read as {fmt} '
                     'names).\n  ' + '\n  '.join(problems))
  return with_backbone(variables, state, keys)
