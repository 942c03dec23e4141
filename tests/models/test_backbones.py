"""ResNet18, EfficientNet-B0 and tiny_cnn against torchvision and timm."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torchvision

from fer_jax import models
from fer_jax.models import pretrained
from tests.models.conftest import make

BACKBONE_COUNTS = {'resnet18': 11_176_512, 'efficientnet_b0': 4_007_548}


def torch_reference(name, source):
  """A random torch model whose BatchNorm statistics are random too."""
  torch.manual_seed(0)
  net = (getattr(torchvision.models, name)() if source == 'torchvision'
         else timm.create_model(name, pretrained=False))
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.3, 0.3)
        module.running_mean.uniform_(-0.3, 0.3)
        module.running_var.uniform_(0.5, 2.0)
  return net.eval()


def pooled_features(net, source, x):
  """The torch model's pooled backbone features of NHWC images."""
  x = torch.from_numpy(x.transpose(0, 3, 1, 2))
  with torch.no_grad():
    if source == 'timm':
      return net.forward_head(net.forward_features(x), pre_logits=True).numpy()
    if isinstance(net, torchvision.models.ResNet):
      return torch.nn.Sequential(*list(net.children())[:-1])(x).flatten(1).numpy()
    return net.avgpool(net.features(x)).flatten(1).numpy()


def test_backbone_parameter_count_equals_torchvision(flax_model):
  name, _, variables = flax_model
  net = getattr(torchvision.models, name)()
  want = sum(p.numel() for n, p in net.named_parameters()
             if not n.startswith(('fc.', 'classifier.')))
  got = sum(x.size for x in jax.tree.leaves(variables['params']['backbone']))
  assert got == want == BACKBONE_COUNTS[name]


def test_outputs_shapes_and_dtypes(flax_model):
  name, model, variables = flax_model
  out = jax.jit(model.apply)(variables, jnp.ones((3, 32, 32, 3)))
  assert out['logits'].shape == (3, 8) and out['va'].shape == (3, 2)
  assert out['features'].shape == (3, 512 if name == 'resnet18' else 1280)
  assert all(v.dtype == jnp.float32 for v in out.values())
  assert float(jnp.abs(out['va']).max()) <= 1.0  # tanh


@pytest.mark.parametrize('source,suffix', [('torchvision', '.pth'),
                                           ('timm', '.pth'),
                                           ('torchvision', '.safetensors')])
def test_loaded_features_match_torch_in_eval_mode(flax_model, source, suffix,
                                                  tmp_path, monkeypatch):
  name, model, variables = flax_model
  net = torch_reference(name, source)
  path = tmp_path / f'{name}{suffix}'
  if suffix == '.pth':
    torch.save(net.state_dict(), path)
  else:
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()}, path)
    monkeypatch.setitem(sys.modules, 'torch', None)  # loads without torch
  loaded = pretrained.load_pretrained(variables, path)
  monkeypatch.undo()
  x = np.random.default_rng(0).normal(size=(4, 64, 64, 3)).astype(np.float32)
  want = pooled_features(net, source, x)
  got = np.asarray(jax.jit(model.apply)(loaded, x)['features'])
  np.testing.assert_allclose(got, want, rtol=1e-4,
                             atol=1e-4 * np.abs(want).max())
  # The head keeps its own initialisation.
  np.testing.assert_array_equal(
      loaded['params']['head']['expression']['kernel'],
      variables['params']['head']['expression']['kernel'])


def test_mismatched_checkpoint_names_every_bad_key(flax_model, tmp_path):
  name, _, variables = flax_model
  state = torch_reference(name, 'torchvision').state_dict()
  first_conv = next(k for k in state if k.endswith('weight')
                    and state[k].ndim == 4)
  first_var = next(k for k in state if k.endswith('running_var'))
  del state[first_var]
  state['extra.weight'] = torch.zeros(3)
  state[first_conv] = torch.zeros(5, 3, 2, 2)
  path = tmp_path / 'bad.pth'
  torch.save(state, path)
  with pytest.raises(ValueError) as error:
    pretrained.load_pretrained(variables, path)
  message = str(error.value)
  assert f"missing (1): ['{first_var}']" in message
  assert "unexpected (1): ['extra.weight']" in message
  assert f'{first_conv}: checkpoint (5, 3, 2, 2)' in message


def test_param_labels_name_each_parameters_part(flax_model):
  """What create_optimizer partitions on to freeze the backbone."""
  _, _, variables = flax_model
  labels = models.param_labels(variables['params'])
  for part in ('backbone', 'head'):
    leaves = jax.tree.leaves(labels[part])
    assert leaves == [part] * len(jax.tree.leaves(variables['params'][part]))


def test_parameter_summary_totals(flax_model):
  name, _, variables = flax_model
  summary = models.parameter_summary(variables)
  assert 'total params backbone' in summary
  assert f'{BACKBONE_COUNTS[name]:,}' in summary
  assert 'params/backbone/' in summary and 'batch_stats/backbone/' in summary


class TorchTinyCNN(torch.nn.Module):
  """tiny_cnn written in torch, by its documented topology."""

  def __init__(self):
    super().__init__()
    widths = (3, 16, 32, 64)
    for i in range(3):
      setattr(self, f'conv{i + 1}', torch.nn.Conv2d(
          widths[i], widths[i + 1], 3, stride=2, padding=1, bias=False))
      setattr(self, f'bn{i + 1}', torch.nn.BatchNorm2d(widths[i + 1]))

  def forward(self, x):
    for i in range(1, 4):
      x = torch.relu(getattr(self, f'bn{i}')(getattr(self, f'conv{i}')(x)))
    return x.mean((2, 3))


def test_tiny_cnn_computes_what_its_torch_twin_computes(tmp_path):
  """The tests' lifecycle runs train tiny_cnn: its topology (strides,
  padding, BatchNorm's epsilon) against torch, through the loader."""
  model, variables = make('tiny_cnn')
  torch.manual_seed(0)
  net = TorchTinyCNN()
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.uniform_(-0.3, 0.3)
        module.running_var.uniform_(0.5, 2.0)
        module.weight.uniform_(0.5, 1.5)
  torch.save(net.state_dict(), tmp_path / 'tiny.pth')
  loaded = pretrained.load_pretrained(variables, tmp_path / 'tiny.pth')
  x = np.random.default_rng(0).normal(size=(2, 33, 33, 3)).astype(np.float32)
  with torch.no_grad():
    want = net.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  got = np.asarray(jax.jit(model.apply)(loaded, x)['features'])
  assert got.shape == (2, 64)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
