"""Several processes that fail: the first failure, in process 0, stops them
all at once with a pointer to it (test_distributed.py trains them)."""

import sys

from tests.conftest import ROOT
from tests.test_distributed import launch


def test_bad_data_in_process_0_stops_every_process(tmp_path):
  """Process 0 reads the data first; when it fails, the others stop with
  a pointer to it, rather than waiting for it at the barrier."""
  (tmp_path / 'empty').mkdir()  # a folder (the config passes), no data
  command = [sys.executable, str(ROOT / 'main.py'), f'--workdir={tmp_path}',
             '--config.data.layout=npy', f'--config.data.root={tmp_path}/empty']
  outputs = launch(lambda i, port: [
      *command, f'--coordinator_address=localhost:{port}',
      '--num_processes=2', f'--process_id={i}'], 2, 1, succeed=False)
  assert f'{tmp_path}/empty' in outputs[0]
  assert 'load_splits failed in process 0' in outputs[1]


def test_a_failed_write_in_process_0_stops_every_process(tmp_path,
                                                        monkeypatch):
  """Process 0 alone writes the record; when that fails (a full disk),
  the others stop with a pointer to it at once, rather than waiting for
  it in the next step until the heartbeat timeout (100 s)."""
  monkeypatch.setenv('FAIL_WRITING', 'data_report.json')
  outputs = launch(lambda i, port: [
      sys.executable, '-m', 'tests.multi_process', str(tmp_path / 'run'),
      str(tmp_path / 'cache'), str(i), '2', str(port)], 2, 1, succeed=False)
  assert 'No space left on device' in outputs[0]
  assert 'write_record failed in process 0' in outputs[1]
