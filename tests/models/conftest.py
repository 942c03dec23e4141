"""The models' shared fixtures: each architecture initialised once a module."""

import jax
import jax.numpy as jnp
import pytest

from fer_jax import models
from fer_jax.configs import default

ARCHITECTURES = ('resnet18', 'efficientnet_b0')


def make(name, dtype='float32'):
  """The default config's model `name` and its variables (32 px)."""
  config = default.get_config().model
  config.name, config.dtype = name, dtype
  model = models.create_model(config)
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x))(
      jnp.zeros((1, 32, 32, 3)))
  return model, variables


@pytest.fixture(scope='module', params=ARCHITECTURES)
def flax_model(request):
  return (request.param, *make(request.param))
