"""Model constructors selected by `config.model.name`, and parameter tools."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fer_jax.labels import NUM_CLASSES
from fer_jax.models.efficientnet import EfficientNetB0, TFEfficientNetB0
from fer_jax.models.heads import FERModel, MultitaskHead
from fer_jax.models.resnet import ResNet18
from fer_jax.models.tiny import TinyCNN

BACKBONES = {'resnet18': ResNet18, 'efficientnet_b0': EfficientNetB0,
             'tf_efficientnet_b0': TFEfficientNetB0, 'tiny_cnn': TinyCNN}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def create_model(config: ml_collections.ConfigDict,
                 axis_name: str | None = None,
                 num_classes: int = NUM_CLASSES) -> FERModel:
  """The backbone named by config.name with the multitask head.

  axis_name: the pmap axis over which BatchNorm averages its training
  statistics (None: this device's batch only). num_classes: the logits,
  one per class of the run's label space (labels.run_classes).
  """
  if config.name not in BACKBONES:
    raise ValueError(f'model.name: {config.name!r} is not one of '
                     f'{sorted(BACKBONES)}')
  if config.dtype not in DTYPES:
    raise ValueError(f'model.dtype: {config.dtype!r} is not one of '
                     f'{sorted(DTYPES)}')
  dtype = DTYPES[config.dtype]
  backbone = BACKBONES[config.name](dtype=dtype, axis_name=axis_name,
                                    kernels=config.get('kernels', 'auto'))
  head = MultitaskHead(dropout_rate=config.dropout_rate,
                       hidden_size=config.hidden_size,
                       va_activation=config.va_activation,
                       num_classes=num_classes)
  return FERModel(backbone=backbone, head=head)


def param_labels(params: Any) -> Any:
  """'backbone' or 'head' for every parameter, for optax.multi_transform."""
  return {part: jax.tree.map(lambda _, part=part: part, tree)
          for part, tree in params.items()}


def _variables(variables: Any):
  """(collection/part/.../leaf name, value) of every variable."""
  for collection in ('params', 'batch_stats'):
    flat = flax.traverse_util.flatten_dict(variables.get(collection, {}))
    for path, value in flat.items():
      yield collection, path, value


def parameter_totals(variables: Any) -> dict[str, int]:
  """Variable counts per collection and part, e.g. 'params backbone'."""
  totals = {}
  for collection, path, value in _variables(variables):
    key = f'{collection} {path[0]}'
    totals[key] = totals.get(key, 0) + int(np.prod(value.shape))
  return totals


def parameter_summary(variables: Any) -> str:
  """A table of every variable (name, shape, count) with totals per part."""
  rows = [(f"{collection}/{'/'.join(path)}", str(tuple(value.shape)),
           int(np.prod(value.shape)))
          for collection, path, value in _variables(variables)]
  totals = parameter_totals(variables)
  params = sum(c for k, c in totals.items() if k.startswith('params'))
  width = max(len(name) for name, _, _ in rows)
  lines = [f"{'variable':{width}}  {'shape':>20}  {'count':>10}"]
  lines += [f'{name:{width}}  {shape:>20}  {count:>10,}'
            for name, shape, count in rows]
  lines += [f'{"total " + key:{width}}  {"":>20}  {count:>10,}'
            for key, count in [*totals.items(), ('params', params)]]
  return '\n'.join(lines)
