"""Backbone weights from torchvision checkpoints (.pth or .safetensors).

The Flax names map to torchvision's one to one: `layer2_0/downsample_conv`
is `layer2.0.downsample.0`, a kernel is `weight` (OIHW, transposed to HWIO),
a BatchNorm scale/bias is `weight`/`bias` and its statistics are
`running_mean`/`running_var`. The classifier (`fc.*`) is not used: the
multitask head keeps its own initialisation.
"""

import re
from pathlib import Path
from typing import Any

import flax
import numpy as np

CLASSIFIER_PREFIXES = ('fc.', 'classifier.')
IGNORED_SUFFIXES = ('num_batches_tracked',)
LEAF_NAMES = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
              ('params', 'bias'): 'bias',
              ('batch_stats', 'mean'): 'running_mean',
              ('batch_stats', 'var'): 'running_var'}


def torch_name(collection: str, path: tuple[str, ...]) -> str:
  """torchvision's state-dict key of a backbone variable."""
  *modules, leaf = path
  names = []
  for module in modules:
    module = re.sub(r'^(layer\d)_(\d+)$', r'\1.\2', module)
    module = module.replace('downsample_conv', 'downsample.0')
    names.append(module.replace('downsample_bn', 'downsample.1'))
  return '.'.join(names + [LEAF_NAMES[(collection, leaf)]])


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


def load_pretrained(variables: Any, path: str | Path) -> Any:
  """variables with the backbone (params and BatchNorm statistics) from path.

  Raises ValueError listing every missing, unexpected and mis-shaped key.
  """
  state = read_state_dict(path)
  variables = flax.core.unfreeze(variables)
  flat = {c: flax.traverse_util.flatten_dict(variables[c]['backbone'])
          for c in ('params', 'batch_stats')}
  expected = {torch_name(c, key): (c, key, value)
              for c in flat for key, value in flat[c].items()}
  missing = sorted(set(expected) - set(state))
  unexpected = sorted(k for k in set(state) - set(expected)
                      if not k.startswith(CLASSIFIER_PREFIXES)
                      and not k.endswith(IGNORED_SUFFIXES))
  misshaped = [f'{name}: checkpoint {tuple(state[name].shape)} (Flax layout '
               f'{to_flax(state[name]).shape}), model {value.shape}'
               for name, (_, _, value) in sorted(expected.items())
               if name in state and to_flax(state[name]).shape != value.shape]
  if missing or unexpected or misshaped:
    raise ValueError(
        f'{path}: does not match the backbone.\n'
        f'  missing ({len(missing)}): {missing}\n'
        f'  unexpected ({len(unexpected)}): {unexpected}\n'
        f'  mis-shaped ({len(misshaped)}): {misshaped}')
  for name, (c, key, value) in expected.items():
    flat[c][key] = to_flax(state[name]).astype(value.dtype)
  for c in flat:
    variables[c]['backbone'] = flax.traverse_util.unflatten_dict(flat[c])
  return variables
