"""--mode=import of an HSEmotion-style model, against timm.

A random timm tf_efficientnet_b0 (HSEmotion's architecture) with a
Linear(1280, 10) classifier, pickled whole as HSEmotion releases it, goes
through tools/convert_hsemotion.py and the import; fer_jax's restore and
eval step, and --mode=predict, must give timm's probabilities and
valence/arousal at 224 px, in fer_jax's class order.
"""

import csv
import hashlib
import json
import re

import cv2
import jax
import numpy as np
import pytest
import safetensors.numpy
import timm
import torch

from fer_jax import import_model, inference, predict, steps
from fer_jax import workdir as workdir_lib
from fer_jax.config_rules import UsageError
from fer_jax.data import pipeline
from fer_jax.labels import EXPRESSIONS
from fer_jax.configs import default
from tests.conftest import tree_digest
from tests.models.test_backbones import torch_reference
from tools import convert_hsemotion

NUM_IMAGES = 4
MEAN = np.array(import_model.IMAGENET_MEAN)
STD = np.array(import_model.IMAGENET_STD)


def hsemotion_like() -> torch.nn.Module:
  """timm's tf_efficientnet_b0 with HSEmotion's classifier, its BatchNorm
  statistics random and every weight perturbed, so none is zero."""
  net = torch_reference('tf_efficientnet_b0', 'timm')
  net.classifier = torch.nn.Linear(1280, 10)
  with torch.no_grad():
    for param in net.parameters():
      param.add_(0.01 * torch.randn_like(param))
    net.classifier.weight.normal_(0.0, 0.1)
    net.classifier.bias.normal_(0.0, 0.5)
  return net.eval()


def base_config(path):
  config = default.get_config()
  config.model.init_from = str(path)
  config.train.eval_batch_size = NUM_IMAGES
  config.predict.detector = 'none'  # the images are faces already
  return config


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """(torch net, .safetensors path, command-line config, workdir, images)."""
  folder = tmp_path_factory.mktemp('hsemotion')
  net = hsemotion_like()
  torch.save(net, folder / 'enet_b0_8_va_mtl.pt')
  path = folder / 'enet_b0_8_va_mtl.safetensors'
  convert_hsemotion.convert(folder / 'enet_b0_8_va_mtl.pt', path)
  config = base_config(path)
  workdir = import_model.import_model(config, folder / 'run')
  size = import_model.IMAGE_SIZE
  images = np.random.default_rng(0).integers(
      0, 256, (NUM_IMAGES, size, size, 3), np.uint8)
  return net, path, config, workdir, images


@pytest.fixture(scope='module')
def timm_outputs(imported):
  """timm's probabilities (fer_jax's class order) and valence/arousal."""
  net, _, _, _, images = imported
  x = ((images / 255.0 - MEAN) / STD).astype(np.float32)
  with torch.no_grad():
    out = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  probs = torch.softmax(torch.from_numpy(out[:, :8]), -1).numpy()
  return probs[:, list(import_model.FROM_HSEMOTION)], out[:, 8:]


def test_restored_model_gives_timms_outputs(imported, timm_outputs):
  _, _, config, workdir, images = imported
  config = inference.trained_config(config, workdir)
  state, p_eval, step = inference.restore(config, workdir, None)
  n = len(images)
  batch = pipeline.pad_and_shard(
      {'image': images, 'label': np.zeros(n, np.int32),
       'va': np.zeros((n, 2), np.float32), 'va_mask': np.zeros(n, bool),
       'mask': np.ones(n, bool)}, NUM_IMAGES, jax.local_device_count())
  out = steps.local_values(p_eval(state, batch))
  want_probs, want_va = timm_outputs
  assert step == import_model.STEP
  assert want_probs.std() > 0.05 and np.abs(want_va).max() > 0.1
  np.testing.assert_allclose(out['probs'].reshape(n, 8), want_probs,
                             atol=1e-4)
  np.testing.assert_allclose(out['va'].reshape(n, 2), want_va, atol=1e-4)


def test_predict_mode_reads_the_import(imported, timm_outputs, tmp_path):
  _, _, config, workdir, images = imported
  for i, image in enumerate(images):
    cv2.imwrite(str(tmp_path / f'{i}.png'), image[..., ::-1])
  output = predict.predict(config, workdir, str(tmp_path))
  with open(output) as f:
    rows = list(csv.DictReader(f))
  want_probs, want_va = timm_outputs
  got = np.array([[float(r[f'prob_{name}']) for name in EXPRESSIONS]
                  for r in rows])
  np.testing.assert_allclose(got, want_probs, atol=1e-4)
  np.testing.assert_allclose(
      [[float(r['valence']), float(r['arousal'])] for r in rows],
      np.clip(want_va, -1, 1), atol=1e-4)


def test_record_says_what_was_imported(imported):
  _, path, _, workdir, _ = imported
  saved = json.loads((workdir / 'config.json').read_text())
  record = json.loads((workdir / 'import.json').read_text())
  assert (saved['model']['name'], saved['model']['va_activation'],
          saved['model']['hidden_size'], saved['data']['image_size']) == (
              'tf_efficientnet_b0', 'none', 0, 224)
  assert saved['data']['mean_rgb'] == list(import_model.IMAGENET_MEAN)
  assert record['sha256'] == hashlib.sha256(path.read_bytes()).hexdigest()
  assert record['source'] == str(path.resolve())
  assert record['classes']['fer_jax_from_hsemotion'] == [5, 4, 6, 7, 3, 2,
                                                         0, 1]
  assert record['conversion']['architecture'] == 'tf_efficientnet_b0'
  assert record['conversion']['source'] == 'enet_b0_8_va_mtl.pt'
  assert (workdir / 'model_summary.txt').exists()
  # HSEmotion's published crop: a tight box, RGB, 224 px, ImageNet's mean.
  contract = json.loads((workdir / 'face_contract.json').read_text())
  assert (contract['geometry'], contract['margin'], contract['colour'],
          contract['image_size'], contract['mean_rgb']) == (
              'box', 0.0, 'rgb', 224, list(import_model.IMAGENET_MEAN))


def test_training_refuses_the_imported_workdir(imported):
  _, _, config, workdir, _ = imported
  with pytest.raises(UsageError, match='holds an imported model'):
    workdir_lib.decide(workdir, config)


def test_refuses_a_workdir_that_holds_a_run(imported):
  _, _, config, workdir, _ = imported
  before = tree_digest(workdir)
  with pytest.raises(UsageError, match=re.escape(
      f'{workdir}: already holds config.json, checkpoints')):
    import_model.import_model(config, workdir)
  assert tree_digest(workdir) == before


def test_refuses_a_missing_file(tmp_path):
  config = base_config(tmp_path / 'absent.safetensors')
  with pytest.raises(UsageError, match='absent.safetensors not found'):
    import_model.import_model(config, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()


def test_refuses_missing_unexpected_and_misshaped_keys(imported, tmp_path):
  _, path, _, _, _ = imported
  state = safetensors.numpy.load_file(path)
  del state['blocks.0.0.bn1.running_var'], state['classifier.bias']
  state['extra.weight'] = np.zeros(3, np.float32)
  state['classifier.weight'] = state['classifier.weight'][:8]
  bad = tmp_path / 'bad.safetensors'
  safetensors.numpy.save_file(state, bad,
                              metadata={'architecture': 'tf_efficientnet_b0'})
  with pytest.raises(UsageError) as error:
    import_model.import_model(base_config(bad), tmp_path / 'run')
  message = str(error.value)
  assert message.startswith(f'{bad}: does not match')
  assert ("missing (2): ['blocks.0.0.bn1.running_var', 'classifier.bias']"
          in message)
  assert "unexpected (1): ['extra.weight']" in message
  assert 'classifier.weight: checkpoint (8, 1280)' in message
  assert not (tmp_path / 'run').exists()


def test_refuses_a_file_without_architecture_unless_named(imported, tmp_path):
  _, path, _, _, _ = imported
  plain = tmp_path / 'plain.safetensors'
  safetensors.numpy.save_file(safetensors.numpy.load_file(path), plain)
  with pytest.raises(UsageError, match="model.name: 'resnet18' is not one "
                     'of tf_efficientnet_b0, efficientnet_b0'):
    import_model.import_model(base_config(plain), tmp_path / 'run')


def test_converter_tells_the_architectures_apart():
  assert convert_hsemotion.architecture(
      timm.create_model('efficientnet_b0')) == 'efficientnet_b0'
  assert convert_hsemotion.architecture(
      timm.create_model('tf_efficientnet_b0')) == 'tf_efficientnet_b0'
  with pytest.raises(ValueError, match='not an EfficientNet'):
    convert_hsemotion.architecture(timm.create_model('resnet18'))
