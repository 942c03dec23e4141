"""Model constructors selected by `config.model.name`."""

import jax.numpy as jnp
import ml_collections

from fer_jax.models.heads import FERModel, MultitaskHead
from fer_jax.models.resnet import ResNet18

BACKBONES = {'resnet18': ResNet18}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def create_model(config: ml_collections.ConfigDict,
                 axis_name: str | None = None) -> FERModel:
  """The backbone named by config.name with the multitask head."""
  if config.name not in BACKBONES:
    raise ValueError(f'model.name: {config.name!r} is not one of '
                     f'{sorted(BACKBONES)}')
  if config.dtype not in DTYPES:
    raise ValueError(f'model.dtype: {config.dtype!r} is not one of '
                     f'{sorted(DTYPES)}')
  dtype = DTYPES[config.dtype]
  backbone = BACKBONES[config.name](dtype=dtype, axis_name=axis_name)
  head = MultitaskHead(dropout_rate=config.dropout_rate,
                       hidden_size=config.hidden_size,
                       va_activation=config.va_activation, dtype=dtype)
  return FERModel(backbone=backbone, head=head)
