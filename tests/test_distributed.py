"""Several processes: 2 processes x 2 CPU devices (gloo collectives on
localhost) train and evaluate as 1 process x 4 devices, and resume.

Why the backbone is frozen in these runs: float sums over 2 + 2 devices
and over 4 are rounded in a different order (1e-7), and a tiny config
(8 images a step; with ResNet18, the tests' backbone when this was
measured, 1x1 maps in layer4 and BatchNorm over 8 values) turns that into
differences of 0.1-3 % in the whole network's gradients by step 2 or 3,
through ReLU and max-pool choices that flip. One process with 2
devices parts from one with 4 just as fast: that is the config, not the
processes. With the heads alone learning, every step's loss, the
evaluations and the final parameters of the whole run can be compared to
1e-5, and they still exercise the per-process data, BatchNorm statistics
synchronised over all 4 devices, the gradient psum (of the whole tree),
the gathered evaluation and the collective checkpoints.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fer_jax import distributed
from tests.conftest import ROOT, command_line, xla_flags
from tests.multi_process import tiny_run_config

SLURM_TWO_TASKS = {'SLURM_NTASKS': '2', 'SLURM_JOB_ID': '7',
                   'SLURM_STEP_NODELIST': 'node[1-2]', 'SLURM_PROCID': '1',
                   'SLURM_LOCALID': '0'}


@pytest.fixture
def calls(monkeypatch) -> list:
  """jax.distributed.initialize's calls, recorded instead of made."""
  made = []
  monkeypatch.setattr(jax.distributed, 'initialize',
                      lambda *args, **kwargs: made.append((args, kwargs)))
  for name in [*SLURM_TWO_TASKS, 'OMPI_MCA_orte_hnp_uri',
               'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES']:
    monkeypatch.delenv(name, raising=False)
  return made


def test_initialize_passes_the_flags(calls):
  distributed.initialize('host0:1234', 2, 1)
  assert calls == [(('host0:1234', 2, 1), {})]


def test_one_process_initializes_nothing(calls):
  distributed.initialize(None, None, None)
  assert calls == []


def test_incomplete_flags_are_refused(calls):
  with pytest.raises(ValueError, match='--num_processes and --process_id'):
    distributed.initialize('host0:1234', 2, None)
  with pytest.raises(ValueError, match='--coordinator_address'):
    distributed.initialize(None, 2, 0)
  assert calls == []


@pytest.mark.parametrize('env, launched', [
    (SLURM_TWO_TASKS, True),
    ({**SLURM_TWO_TASKS, 'SLURM_NTASKS': '1'}, False),  # one task: alone
    ({'OMPI_MCA_orte_hnp_uri': 'x', 'OMPI_COMM_WORLD_SIZE': '4'}, True),
])
def test_a_launcher_s_environment_initializes_without_arguments(
    calls, monkeypatch, env, launched):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  distributed.initialize(None, None, None)
  assert calls == ([((), {})] if launched else [])


def test_num_processes_1_runs_alone_under_a_launcher(calls, monkeypatch):
  """srun -n 4 of four independent runs."""
  for name, value in SLURM_TWO_TASKS.items():
    monkeypatch.setenv(name, value)
  distributed.initialize(None, 1, None)
  assert calls == []


def test_open_mpi_5_is_refused_rather_than_run_as_independent_copies(
    calls, monkeypatch):
  """JAX 0.10.2 detects Open MPI 4 only (OMPI_MCA_orte_hnp_uri): under
  Open MPI 5 every rank would otherwise train alone as process 0."""
  monkeypatch.setenv('OMPI_COMM_WORLD_SIZE', '4')
  with pytest.raises(ValueError, match=r'--num_processes=4 --process_id='):
    distributed.initialize(None, None, None)
  distributed.initialize(None, 1, None)
  assert calls == []


def test_child_processes_never_initialize(calls, monkeypatch):
  """A Grain worker (or any multiprocessing child): its parent owns the
  devices and the connection to the coordinator."""
  monkeypatch.setattr(distributed.multiprocessing, 'parent_process',
                      lambda: object())
  distributed.initialize('host0:1234', 2, 1)
  for name, value in SLURM_TWO_TASKS.items():
    monkeypatch.setenv(name, value)
  distributed.initialize(None, None, None)
  assert calls == []


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def launch(command_of, num_processes: int, devices: int,
           succeed: bool = True) -> list[str]:
  """command_of(process_id, port) run in num_processes processes with
  `devices` CPU devices each; their outputs. Each must succeed, or fail."""
  port = _free_port()
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': xla_flags(devices)}
  procs = [subprocess.Popen(command_of(i, port), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
           for i in range(num_processes)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert (p.returncode == 0) == succeed, out[-3000:]
  return outputs


def train_tiny(workdir: Path, cache_dir: Path, num_processes: int,
               devices: int, num_workers: int = 0) -> list[str]:
  """tests/multi_process.py: the tiny run, with every step's loss."""
  return launch(lambda i, port: [
      sys.executable, '-m', 'tests.multi_process', str(workdir), str(cache_dir),
      str(i), str(num_processes), str(port), str(num_workers)],
      num_processes, devices)


def final_params(workdir: Path) -> dict:
  """The last checkpoint's parameters, flattened to {path: array}."""
  numbers = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()
                   if p.name.isdigit())
  state = ocp.StandardCheckpointer().restore(
      workdir / 'checkpoints' / str(numbers[-1]) / 'state')
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
          jax.tree_util.tree_leaves_with_path(state['params'])}


def read_json(path: Path):
  return json.loads(path.read_text())


@pytest.fixture(scope='module')
def runs(tmp_path_factory, data_cache):
  """The tiny run on 1 process x 4 devices and on 2 processes x 2:
  (workdir of one, workdir of two, the two processes' outputs)."""
  one = tmp_path_factory.mktemp('one_process') / 'run'
  two = tmp_path_factory.mktemp('two_processes') / 'run'
  train_tiny(one, data_cache, 1, 4)
  outputs = train_tiny(two, data_cache, 2, 2)
  return one, two, outputs


def test_every_step_loss_of_two_processes_is_that_of_one(runs):
  one, two, _ = runs
  reference = read_json(one.parent / 'losses_0.json')
  first, second = (read_json(two.parent / f'losses_{i}.json')
                   for i in (0, 1))
  assert len(reference) == 18  # 2 epochs x 9 steps
  assert first == second  # the loss is of the global batch, in both
  np.testing.assert_allclose(first, reference, atol=1e-5, rtol=0)
  # Not all equal by accident: the batches differ step to step.
  assert np.ptp(reference) > 0.1


def test_two_processes_evaluate_and_end_as_one(runs):
  one, two, _ = runs
  records = [[json.loads(line) for line in
              (w / 'metrics.jsonl').read_text().splitlines()]
             for w in (one, two)]
  assert len(records[0]) == len(records[1]) == 2
  for a, b in zip(*records):
    for key in ('train_loss', 'train_accuracy', 'val_loss', 'val_accuracy',
                'val_macro_f1', 'val_valence_ccc', 'val_arousal_rmse'):
      assert b[key] == pytest.approx(a[key], abs=1e-5), key
  test_one, test_two = (read_json(w / 'report' / 'test_metrics.json')
                        for w in (one, two))
  # Every test example counted once, by the same predictions.
  assert test_two['num_examples'] == test_one['num_examples'] == 32
  assert np.sum(test_two['confusion_matrix']) == 32
  assert test_two['confusion_matrix'] == test_one['confusion_matrix']
  for key in ('loss', 'accuracy', 'macro_f1', 'valence_ccc',
              'arousal_rmse'):
    assert test_two[key] == pytest.approx(test_one[key], abs=1e-5), key
  a, b = final_params(one), final_params(two)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_allclose(b[key], a[key], atol=1e-5, err_msg=key)


def test_process_zero_alone_writes_and_talks(runs):
  one, two, outputs = runs
  assert 'Best checkpoint' in outputs[0]
  assert 'Best checkpoint' not in outputs[1]
  assert 'epoch 1/2' not in outputs[1]  # no progress bar
  written = lambda w: sorted(str(p.relative_to(w)) for p in w.rglob('*')
                             if 'checkpoints' not in p.parts and
                             'tb' not in p.parts)
  assert written(two) == written(one)  # once each, nothing per process
  # Both processes' data-iterator states are in the checkpoint.
  saved = read_json(two / 'checkpoints' / '12' / 'data' / 'metadata')
  assert len(saved['iterators']) == 2


def test_main_evaluates_a_one_process_run_on_two_processes(runs, tmp_path,
                                                          data_cache):
  """main.py --mode=evaluate with the distributed flags."""
  one, _, _ = runs
  workdir = tmp_path / 'run'
  shutil.copytree(one, workdir)
  command = command_line(tiny_run_config(data_cache), workdir)
  outputs = launch(lambda i, port: [
      *command, '--mode=evaluate', f'--coordinator_address=localhost:{port}',
      '--num_processes=2', f'--process_id={i}'], 2, 2)
  assert 'Report:' in outputs[0] and 'Report:' not in outputs[1]
  theirs = read_json(one / 'report' / 'test_metrics.json')
  # Beside training's report, in one folder: process 0 alone wrote it.
  assert read_json(workdir / 'report' / 'test_metrics.json') == theirs
  folders = list((workdir / 'report' / 'eval').iterdir())
  assert [f.name for f in folders] == [f"test-step{theirs['checkpoint_step']}"]
  ours = read_json(folders[0] / 'test_metrics.json')
  assert ours['num_examples'] == 32
  assert ours['confusion_matrix'] == theirs['confusion_matrix']
  for key in ('loss', 'accuracy', 'valence_ccc', 'arousal_pcc'):
    assert ours[key] == pytest.approx(theirs[key], abs=1e-5), key


def test_two_processes_resume_mid_epoch_from_their_checkpoint(runs, tmp_path,
                                                              data_cache):
  _, two, _ = runs
  workdir = tmp_path / 'run'
  shutil.copytree(two, workdir)
  for step in (16, 18):
    shutil.rmtree(workdir / 'checkpoints' / str(step))
  shutil.rmtree(workdir / 'report')
  # With Grain worker processes this time (children of processes that
  # joined jax.distributed), so the batches restart at the checkpoint's
  # step rather than from the saved thread-only iterator positions.
  outputs = train_tiny(workdir, data_cache, 2, 2, num_workers=1)
  assert 'Resuming from the checkpoint of step 12' in outputs[0]
  assert 'Resuming' not in outputs[1]
  # Steps 13-18 again: the same losses and parameters as the uninterrupted
  # run, bit for bit.
  assert (read_json(tmp_path / 'losses_0.json') ==
          read_json(two.parent / 'losses_0.json')[12:])
  a, b = final_params(two), final_params(workdir)
  for key in a:
    np.testing.assert_array_equal(b[key], a[key], err_msg=key)
  assert (read_json(workdir / 'report' / 'test_metrics.json')['accuracy'] ==
          read_json(two / 'report' / 'test_metrics.json')['accuracy'])
