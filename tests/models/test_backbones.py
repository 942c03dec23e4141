"""ResNet18 and EfficientNet-B0 against torchvision and timm."""

import sys
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torchvision

from configs import default
from fer_jax import models
from fer_jax.models import efficientnet, layers, pretrained

ARCHITECTURES = ('resnet18', 'efficientnet_b0')
BACKBONE_COUNTS = {'resnet18': 11_176_512, 'efficientnet_b0': 4_007_548}


def make(name, dtype='float32'):
  config = default.get_config().model
  config.name, config.dtype = name, dtype
  model = models.create_model(config)
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x))(
      jnp.zeros((1, 32, 32, 3)))
  return model, variables


@pytest.fixture(scope='module', params=ARCHITECTURES)
def flax_model(request):
  return (request.param, *make(request.param))


class Step(NamedTuple):
  """A training step's results, and its compiled functions of the
  dropout key."""
  features: jax.Array      # evaluation mode
  loss: float
  grads: dict
  outputs: dict            # training mode
  train_features: Callable[[jax.Array], jax.Array]
  eval_features: Callable[[jax.Array], jax.Array]


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


@pytest.fixture(scope='module')
def training_step():
  """compute(name, variables, kernels, dtype): a Step of the multitask loss
  on 4 images of 64 px in training mode, from the same float32 variables;
  each (name, kernels, dtype) compiled once."""
  from fer_jax import losses
  rng = np.random.default_rng(1)
  batch = {'image': rng.normal(size=(4, 64, 64, 3)).astype(np.float32),
           'label': np.array([0, 3, 5, 7], np.int32),
           'va': rng.uniform(-1, 1, (4, 2)).astype(np.float32),
           'va_mask': np.ones(4, bool), 'mask': np.ones(4, bool)}
  done = {}

  def compute(name, variables, kernels='cpu', dtype='float32'):
    if (name, kernels, dtype) in done:
      return done[name, kernels, dtype]
    config = default.get_config().model
    config.name, config.kernels, config.dtype = name, kernels, dtype
    model = models.create_model(config)

    def loss_fn(params, key):
      outputs, _ = model.apply(
          {**variables, 'params': params}, batch['image'], train=True,
          mutable=['batch_stats'], rngs={'dropout': key})
      sums = losses.loss_sums(outputs, batch)
      return losses.normalise(sums, 1.0)['loss'], outputs

    train = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    evaluate = jax.jit(lambda key: model.apply(
        variables, batch['image'], rngs={'dropout': key})['features'])
    (loss, outputs), grads = train(variables['params'], jax.random.PRNGKey(1))
    done[name, kernels, dtype] = Step(
        evaluate(jax.random.PRNGKey(1)), float(loss), grads, outputs,
        lambda key: train(variables['params'], key)[0][1]['features'],
        evaluate)
    return done[name, kernels, dtype]

  return compute


def test_bfloat16_step_is_close_to_float32_with_a_float32_head(
    flax_model, training_step):
  """With XLA's own convolutions (model.kernels='library'): bfloat16 is for
  GPUs and TPUs, where 'auto' picks them, and XLA:CPU compiles
  EfficientNet-B0's bfloat16 gradient with the CPU kernels in twice the
  time (29 against 16 s). Measured here: losses within 0.15% (ResNet18)
  and 0.4% (EfficientNet-B0), gradient cosines 0.94 both.
  Training-mode BatchNorm over the last stages' 16 values (2 x 2 maps of
  4 images) amplifies bfloat16's rounding; the bounds leave a margin."""
  name, _, variables = flax_model
  _, loss16, grads16, out16, *_ = training_step(name, variables, 'library',
                                                'bfloat16')
  _, loss32, grads32, *_ = training_step(name, variables, 'library')
  flat = lambda tree: np.concatenate(
      [np.ravel(g) for g in jax.tree.leaves(tree)]).astype(np.float64)
  grad16, grad32 = flat(grads16), flat(grads32)
  cosine = grad16 @ grad32 / np.linalg.norm(grad16) / np.linalg.norm(grad32)
  assert loss16 == pytest.approx(loss32, rel=0.03)
  assert cosine > 0.8
  # The head's outputs are not bfloat16 numbers (8 significant bits) cast
  # to float32, as a bfloat16 head's were.
  for key in ('logits', 'va'):
    value = np.asarray(out16[key])
    as_bf16 = np.asarray(jnp.asarray(value, jnp.bfloat16), np.float32)
    assert value.dtype == np.float32 and np.mean(as_bf16 == value) < 0.5


def test_bfloat16_computes_the_backbone_in_bfloat16():
  model, variables = make('resnet18', 'bfloat16')
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  hlo = jax.jit(model.apply).lower(variables, jnp.ones((2, 32, 32, 3))
                                   ).as_text()
  assert 'bf16' in hlo


def test_only_efficientnet_training_is_random(flax_model, training_step):
  """Stochastic depth drops EfficientNet-B0's blocks in training alone;
  ResNet18 has nothing random (no dropout before the heads here)."""
  name, _, variables = flax_model
  step = training_step(name, variables)
  keys = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
  first, second = (np.asarray(step.train_features(key)) for key in keys)
  assert np.allclose(first, second) == (name == 'resnet18')
  np.testing.assert_array_equal(step.eval_features(keys[0]),
                                step.eval_features(keys[1]))


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


@pytest.mark.parametrize('kernel,strides,size', [(3, 1, 9), (5, 2, 11),
                                                 (3, 2, 8), (5, 1, 6)])
def test_depthwise_shifted_equals_library_with_gradients(kernel, strides,
                                                         size):
  rng = np.random.default_rng(kernel * 10 + strides)
  x = jnp.asarray(rng.normal(size=(2, size, size, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, 6)), jnp.float32)
  pad = (kernel - 1) // 2

  def run(impl):
    loss = lambda x, w: jnp.sum(jnp.sin(
        efficientnet.DEPTHWISE[impl](x, w, strides, pad)))
    return efficientnet.DEPTHWISE[impl](x, w, strides, pad), jax.grad(
        loss, (0, 1))(x, w)

  (want, want_grads), (got, got_grads) = run('library'), run('cpu')
  out = (size + 2 * pad - kernel) // strides + 1
  assert got.shape == want.shape == (2, out, out, 6)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for g, w_ in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w_, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('kernel,strides,pad', [(3, 2, 1), (5, 2, 2),
                                                (3, 2, 0)])
def test_depthwise_shifted_gradients_on_a_non_square_map(kernel, strides,
                                                         pad):
  """Against the library's grouped convolution. 6 x 11: the strided
  windows end one pixel short of the edge in one axis and not in the
  other, so each axis needs its own padding of dy (on 6 x 10 both axes
  happen to need the same). pad 0: TensorFlow's SAME, padded before."""
  rng = np.random.default_rng(kernel + pad)
  x = jnp.asarray(rng.normal(size=(2, 6, 11, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, 4)), jnp.float32)
  library = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (strides, strides), ((pad, pad), (pad, pad)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=4)
  ours = lambda x, w: efficientnet.depthwise_shifted(x, w, strides, pad)
  grads = lambda conv: jax.grad(
      lambda x, w: jnp.sum(jnp.sin(conv(x, w))), (0, 1))(x, w)
  np.testing.assert_allclose(ours(x, w), library(x, w), rtol=1e-5, atol=1e-5)
  for got, want in zip(grads(ours), grads(library)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_depthwise_kernel_gradient_of_bfloat16_multiplies_in_float32():
  """Against float64 NumPy of the same bfloat16 x and dy; the kernel is
  float32, so its gradient comes back unrounded. Measured: 6e-8 relative
  (float32 products); 1.5e-3 with each product rounded to bfloat16.

  Run op by op: under jit, XLA:CPU's fusion multiplies in float32 whatever
  the program says, which other backends need not do.
  """
  rng = np.random.default_rng(2)
  k, strides, pad = 3, 2, 1
  x = jnp.asarray(rng.normal(size=(4, 10, 10, 8)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(k, k, 1, 8)), jnp.float32)
  with jax.disable_jit():
    y, vjp = jax.vjp(
        lambda w: efficientnet.depthwise_shifted(x, w, strides, pad), w)
    dy = jnp.asarray(rng.normal(size=y.shape), jnp.bfloat16)
    got, = vjp(dy)
  padded = np.pad(np.float64(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  span = strides * (y.shape[1] - 1) + 1
  want = np.array([[np.einsum(
      'bhwc,bhwc->c', padded[:, i:i + span:strides, j:j + span:strides],
      np.float64(dy)) for j in range(k)] for i in range(k)])[:, :, None]
  error = np.linalg.norm(np.float64(got) - want) / np.linalg.norm(want)
  assert got.dtype == jnp.float32 and error < 1e-5


# The first shape is 1.5 MB an image: three chunks of one image each.
@pytest.mark.parametrize('kernel,strides,shape', [
    (3, 1, (3, 128, 128, 24)), (7, 2, (2, 21, 21, 3)), (3, 2, (2, 9, 9, 8))])
def test_conv_matmul_grad_equals_xla_with_gradients(kernel, strides, shape):
  rng = np.random.default_rng(kernel + strides)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, shape[-1], 5)),
                  jnp.float32)
  pad = kernel // 2
  xla = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (strides, strides), ((pad, pad), (pad, pad)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  ours = lambda x, w: layers.conv_matmul_grad(x, w, strides, pad)
  grads = lambda conv: jax.jit(jax.grad(
      lambda x, w: jnp.sum(jnp.sin(conv(x, w))), (0, 1)))(x, w)
  np.testing.assert_allclose(ours(x, w), xla(x, w), rtol=1e-5, atol=1e-4)
  for got, want in zip(grads(ours), grads(xla)):
    np.testing.assert_allclose(got, want, rtol=1e-4,
                               atol=1e-4 * float(np.abs(want).max()))


def test_kernel_choices_share_parameters_outputs_and_gradients(
    flax_model, training_step):
  name, _, variables = flax_model
  x = jnp.zeros((1, 32, 32, 3))
  shapes = {}
  for impl in ('cpu', 'library'):
    config = default.get_config().model
    config.name, config.kernels = name, impl
    shapes[impl] = jax.tree.map(np.shape, jax.eval_shape(
        models.create_model(config).init, jax.random.PRNGKey(0), x))
  assert shapes['cpu'] == shapes['library']
  (features, _, grads, *_), (want_features, _, want_grads, *_) = (
      training_step(name, variables, impl) for impl in ('cpu', 'library'))
  np.testing.assert_allclose(features, want_features, rtol=1e-4, atol=1e-5)
  # Gradients that cancel (a bias before the next BatchNorm) are rounding
  # noise: tolerances scale with the largest gradient.
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grads))
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * scale)
  config.kernels = 'fft'
  with pytest.raises(ValueError, match="model.kernels: 'fft'"):
    models.create_model(config).init(jax.random.PRNGKey(0), x)


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
