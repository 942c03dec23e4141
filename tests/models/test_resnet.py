"""ResNet18 and the multitask head against torchvision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from configs import default
from fer_jax import models
from fer_jax.models import pretrained


def make(dtype='float32'):
  config = default.get_config().model
  config.dtype = dtype
  model = models.create_model(config)
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x))(
      jnp.zeros((1, 32, 32, 3)))
  return model, variables


@pytest.fixture(scope='module')
def float32_model():
  return make()


def count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def test_backbone_parameter_count_equals_torchvision(float32_model):
  _, variables = float32_model
  torch_model = torchvision.models.resnet18()
  want = sum(p.numel() for n, p in torch_model.named_parameters()
             if not n.startswith('fc.'))
  assert count(variables['params']['backbone']) == want == 11_176_512


def test_outputs_shapes_and_dtypes(float32_model):
  model, variables = float32_model
  out = model.apply(variables, jnp.ones((3, 32, 32, 3)))
  assert out['logits'].shape == (3, 8) and out['va'].shape == (3, 2)
  assert out['features'].shape == (3, 512)
  assert all(v.dtype == jnp.float32 for v in out.values())
  assert float(jnp.abs(out['va']).max()) <= 1.0  # tanh


def test_bfloat16_computes_in_bfloat16_with_float32_parameters():
  model, variables = make('bfloat16')
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  out = model.apply(variables, jnp.ones((2, 32, 32, 3)))
  assert out['logits'].dtype == jnp.float32
  hlo = jax.jit(model.apply).lower(variables, jnp.ones((2, 32, 32, 3))
                                   ).as_text()
  assert 'bf16' in hlo


@pytest.fixture(scope='module')
def torchvision_checkpoint(tmp_path_factory):
  """A torchvision ResNet18 with random weights and BatchNorm statistics."""
  torch.manual_seed(0)
  net = torchvision.models.resnet18()
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.3, 0.3)
        module.running_mean.uniform_(-0.3, 0.3)
        module.running_var.uniform_(0.5, 2.0)
  net.eval()
  path = tmp_path_factory.mktemp('ckpt') / 'resnet18.pth'
  torch.save(net.state_dict(), path)
  return net, path


def test_loaded_features_match_torchvision_in_eval_mode(float32_model,
                                                        torchvision_checkpoint):
  model, variables = float32_model
  net, path = torchvision_checkpoint
  loaded = pretrained.load_pretrained(variables, path)
  x = np.random.default_rng(0).normal(size=(4, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    trunk = torch.nn.Sequential(*list(net.children())[:-1])
    want = trunk(torch.from_numpy(x.transpose(0, 3, 1, 2))).flatten(1).numpy()
  got = np.asarray(model.apply(loaded, x, train=False)['features'])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(
      want).max())
  # The head keeps its own initialisation.
  np.testing.assert_array_equal(loaded['params']['head']['expression']['kernel'],
                                variables['params']['head']['expression']['kernel'])


def test_mismatched_checkpoint_names_every_bad_key(float32_model,
                                                   torchvision_checkpoint,
                                                   tmp_path):
  _, variables = float32_model
  net, _ = torchvision_checkpoint
  state = net.state_dict()
  del state['layer1.0.bn1.running_var']
  state['layer9.weight'] = torch.zeros(3)
  state['conv1.weight'] = torch.zeros(64, 3, 5, 5)
  path = tmp_path / 'bad.pth'
  torch.save(state, path)
  with pytest.raises(ValueError) as error:
    pretrained.load_pretrained(variables, path)
  message = str(error.value)
  assert "missing (1): ['layer1.0.bn1.running_var']" in message
  assert "unexpected (1): ['layer9.weight']" in message
  assert 'conv1.weight: checkpoint (64, 3, 5, 5)' in message
