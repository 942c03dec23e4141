"""--mode=benchmark, the PyTorch reference rows and compare.py's ratios."""

import json
import os
import sys

import numpy as np
import pytest
import torch

from benchmarks import compare, profile_step, torch_reference
from fer_jax import benchmark, hugepages
from fer_jax.errors import UsageError
from fer_jax.configs import benchmark as benchmark_config
from tests.conftest import NUM_DEVICES, tiny_config

KEYS = ('model', 'batch_size', 'image_size', 'dtype', 'num_devices',
        'device_kind', 'compile_s', 'step_ms_median', 'images_per_sec')


@pytest.fixture(scope='module')
def rows(tmp_path_factory, data_cache):
  config = tiny_config(data_cache)
  config.benchmark = benchmark_config.get_config().benchmark
  config.benchmark.models = ('tiny_cnn',)  # the machinery, not a model
  config.benchmark.batch_sizes = (4, 8)
  config.benchmark.image_sizes = (32,)
  config.benchmark.warmup_steps = 1
  config.benchmark.steps = 3
  config.benchmark.pipeline_batches = 2
  workdir = tmp_path_factory.mktemp('benchmark')
  benchmark.run(config, str(workdir))
  with open(workdir / 'benchmark.json') as f:
    return json.load(f)


def test_benchmark_json_has_a_row_per_configuration(rows):
  assert [(r['model'], r['batch_size'], r['image_size'], r['dtype'])
          for r in rows] == [('tiny_cnn', 4, 32, 'float32'),
                             ('tiny_cnn', 8, 32, 'float32')]
  for row in rows:
    assert all(row[k] is not None for k in KEYS)
    assert row['num_devices'] == NUM_DEVICES
    assert row['xla_flags'] == os.environ['XLA_FLAGS']  # what ran, recorded
    assert row['glibc_tunables'] == os.environ.get('GLIBC_TUNABLES', '')
    assert row['transparent_hugepages'] == hugepages.thp_mode()
    assert row['loss_finite']
    assert row['step_ms_p10'] <= row['step_ms_median'] <= row['step_ms_p90']
    np.testing.assert_allclose(
        row['images_per_sec'], row['batch_size'] / row['step_ms_median'] * 1e3)
    np.testing.assert_allclose(row['images_per_sec_per_device'],
                               row['images_per_sec'] / NUM_DEVICES)
    assert row['pipeline_images_per_sec'] > 0 and row['fed_images_per_sec'] > 0


def test_flops_are_per_image_whatever_the_batch(rows):
  small, large = rows
  np.testing.assert_allclose(small['model_flops_per_image'],
                             large['model_flops_per_image'], rtol=1e-3)
  # A train step is the forward pass, about twice that backward, and the
  # optimiser's update, whose cost per step is shared by the batch.
  assert small['train_flops_per_image'] > large['train_flops_per_image']
  assert 2.5 < large['train_flops_per_image'] / large[
      'model_flops_per_image'] < 4.5


def test_too_few_images_for_the_pipeline_benchmark_names_the_fix(rows):
  config = benchmark_config.get_config()
  config.benchmark.pipeline_batches = 1000
  with pytest.raises(UsageError, match='data.synthetic.num_train'):
    benchmark.check_pipeline_size(config, num_records=100, batch_size=32)


def test_torch_reference_row_matches_the_jax_row_format():
  row = torch_reference.benchmark_row('resnet18', 'eager', 4, 32, 'float32',
                                      torch.device('cpu'), 1, 2)
  assert row['framework'] == 'torch' and row['loss_finite']
  assert all(row[k] is not None for k in KEYS if k != 'compile_s')
  assert row['glibc_tunables'] == os.environ.get('GLIBC_TUNABLES', '')
  assert row['transparent_hugepages'] == hugepages.thp_mode()
  np.testing.assert_allclose(
      row['images_per_sec'], row['batch_size'] / row['step_ms_median'] * 1e3)


def test_compare_ratios_and_failed_children(tmp_path, monkeypatch):
  jax_rows = [{'images_per_sec': 30.0}, {'images_per_sec': 40.0},
              {'error': 'x'}]
  torch_rows = [{'images_per_sec': 20.0, 'mode': 'eager'}]
  assert compare.fastest(jax_rows)['images_per_sec'] == 40.0
  assert compare.ratio(compare.fastest(jax_rows), torch_rows[0]) == 2.0
  assert compare.ratio(None, torch_rows[0]) is None
  # Each child, PyTorch's too, gets the memory pages main.py gives itself
  # (here, where the tests left GLIBC_TUNABLES unset).
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  env = tmp_path / 'env.json'
  compare.run_child([sys.executable, '-c', 'import json, os; json.dump('
                     f'dict(os.environ), open({str(env)!r}, "w"))'],
                    str(env), timeout=60)
  pages = hugepages.restart_environment_here(dict(os.environ))
  assert json.loads(env.read_text()) == (pages or dict(os.environ))
  failed = compare.run_child([sys.executable, '-c', 'import sys; sys.exit(3)'],
                             str(tmp_path / 'none.json'), timeout=60)
  assert failed[0].keys() == {'error'}
  assert compare.fastest(failed) is None


def test_pair_matches_rows_of_two_runs_by_configuration(tmp_path):
  def row(framework, mode, model, ips):
    return {'framework': framework, 'mode': mode, 'model': model,
            'dtype': 'bfloat16', 'image_size': 224, 'batch_size': 256,
            'images_per_sec': ips}
  (tmp_path / 'jax.json').write_text(json.dumps(
      [row('jax', 'pmap', 'resnet18', 300.0),
       row('jax', 'pmap', 'efficientnet_b0', 90.0)]))
  (tmp_path / 'torch.json').write_text(json.dumps(
      [row('torch', 'compile', 'resnet18', 200.0),
       row('torch', 'eager', 'resnet18', 100.0),
       row('torch', 'compile', 'efficientnet_b0', 60.0),
       {'framework': 'torch', 'mode': 'eager', 'model': 'efficientnet_b0',
        'error': 'torch.compile failed'}]))
  compare.pair(str(tmp_path / 'jax.json'), str(tmp_path / 'torch.json'),
               str(tmp_path))
  results = {r['model']: r['ratio']
             for r in json.loads((tmp_path / 'compare.json').read_text())}
  assert results == {'resnet18': {'compile': 1.5, 'eager': 3.0},
                     'efficientnet_b0': {'compile': 1.5, 'eager': None}}


def _trace(device: bool) -> dict:
  """Two annotated steps of 10 ms: on a GPU two kernels per step on a
  stream (and a line that repeats them, which must not count twice); on a
  CPU the same ops run by a host thread."""
  meta = [{'ph': 'M', 'pid': 1, 'name': 'process_name',
           'args': {'name': '/host:CPU'}},
          {'ph': 'M', 'pid': 2, 'name': 'process_name',
           'args': {'name': '/device:GPU:0'}},
          {'ph': 'M', 'pid': 2, 'tid': 7, 'name': 'thread_name',
           'args': {'name': 'Stream #7(Kernel)'}},
          {'ph': 'M', 'pid': 2, 'tid': 9, 'name': 'thread_name',
           'args': {'name': 'XLA Ops'}}]
  events = []
  for k in range(2):
    t = k * 10_000
    events.append({'ph': 'X', 'pid': 1, 'tid': 1, 'ts': t, 'dur': 10_000,
                   'name': profile_step.STEP})
    for name, hlo, start, dur in (('sm90_conv', 'cudnn-conv.1', 0, 6000),
                                  ('loop_fusion_3', 'fusion.3', 6000, 2000)):
      for pid, tid in ((2, 7), (2, 9)) if device else ((1, 3),):
        events.append({'ph': 'X', 'pid': pid, 'tid': tid, 'ts': t + start,
                       'dur': dur, 'name': name, 'args': {'hlo_op': hlo}})
  return {'traceEvents': (meta if device else meta[:1]) + events}


@pytest.mark.parametrize('device', [True, False])
def test_profile_top_ops_per_step(device):
  summary = profile_step.top_ops(_trace(device), top=1)
  assert summary['source'].startswith('GPU' if device else 'XLA')
  assert summary['steps'] == 2 and summary['step_ms'] == 10.0
  assert summary['busy_ms'] == 8.0 and summary['busy_percent'] == 80.0
  assert summary['ops'] == [{'name': 'sm90_conv', 'hlo_op': 'cudnn-conv.1',
                             'calls': 1.0, 'ms': 6.0, 'percent': 60.0}]
  assert '| 1 | `sm90_conv` | cudnn-conv.1 | 1 | 6.000 | 60.0 |' in (
      profile_step.format_markdown('resnet18', summary))
