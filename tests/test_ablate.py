"""--mode=ablate: runs, skips, resumes, records failures and collects."""

import contextlib
import copy
import csv
import ctypes
import importlib
import io
import json
import logging as python_logging
import math
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from fer_jax import (ablate, ablate_processes, evaluation, files, run_lock,
                     steps)
from fer_jax.configs import default
from fer_jax.configs.ablations import ablation
from fer_jax.config_rules import UsageError
from fer_jax.labels import EXPRESSIONS
from tests.conftest import (ROOT, live_children, tiny_config,
                            tree_digest)

VARIANTS = {'balanced': {},
            'weighted': {'data.sampler': 'uniform',
                         'train.class_weights': 'inverse_frequency'}}


def tiny_ablation(cache_dir: Path):
  """Two variants x two seeds of the tiny config, one epoch each, with a
  mid-epoch checkpoint at step 4 to resume from."""
  base = tiny_config(cache_dir)
  base.train.num_epochs = 1
  base.train.checkpoint_every_steps = 4
  base.train.keep_checkpoints = 3
  return ablation(base, VARIANTS, seeds=(0, 1))


def read_csv(path: Path) -> list[dict]:
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def ablated(tmp_path_factory, data_cache):
  """The tiny ablation run once: (config, workdir, rows)."""
  config = tiny_ablation(data_cache)
  workdir = tmp_path_factory.mktemp('ablation')
  return config, workdir, ablate.run(config, str(workdir))


def test_every_variant_and_seed_runs_in_its_own_folder(ablated):
  config, workdir, rows = ablated
  assert [(r['variant'], r['seed'], r['status']) for r in rows] == [
      ('balanced', 0, 'finished'), ('balanced', 1, 'finished'),
      ('weighted', 0, 'finished'), ('weighted', 1, 'finished')]
  for row in rows:
    saved = json.loads((Path(row['workdir']) / 'config.json').read_text())
    assert Path(row['workdir']) == workdir / row['variant'] / \
        f"seed_{row['seed']}"
    assert saved['train']['seed'] == row['seed']
    assert (saved['data']['sampler'], saved['train']['class_weights']) == (
        ('balanced', 'none') if row['variant'] == 'balanced' else
        ('uniform', 'inverse_frequency'))
  # The seed reaches training: the two seeds' first losses differ.
  first = [files.read_jsonl(Path(r['workdir']) / 'metrics.jsonl')
           [0]['train_loss'] for r in rows[:2]]
  assert first[0] != first[1]


def test_csv_holds_each_runs_test_metrics(ablated):
  _, workdir, _ = ablated
  rows = read_csv(workdir / 'ablation.csv')
  assert len(rows) == 4
  for row in rows:
    metrics = json.loads((Path(row['workdir']) / 'report' /
                          'test_metrics.json').read_text())
    for key in ('accuracy', 'macro_f1', 'valence_ccc', 'best_epoch',
                'train_seconds'):
      assert float(row[key]) == pytest.approx(metrics[key], abs=1e-12)
    for name in EXPRESSIONS:
      assert float(row[f'recall_{name}']) == pytest.approx(
          metrics['per_class'][name]['recall'], abs=1e-12)
    assert float(row['train_seconds']) > 0
    assert int(row['epochs_trained']) == 1


def _md_row(markdown: str, section: str, variant: str) -> list[str]:
  """The cells of a variant's row in a section's table."""
  part = markdown.split(f'## {section}')[1].split('\n## ')[0]
  for line in part.splitlines():
    cells = [c.strip() for c in line.strip('|').split('|')]
    if cells[0] == variant:
      return cells
  raise AssertionError(f'no row {variant!r} in {section!r}')


def test_markdown_gives_mean_std_best_and_paired_difference(ablated):
  config, workdir, _ = ablated
  rows = read_csv(workdir / 'ablation.csv')
  markdown = (workdir / 'ablation.md').read_text()
  metrics = list(config.ablate.metrics)
  value = lambda variant, key: [float(r[key]) for r in rows
                                if r['variant'] == variant]
  means = {}
  for variant in VARIANTS:
    cells = _md_row(markdown, 'Test metrics', variant)
    for j, key in enumerate(metrics):
      v = value(variant, key)
      means[variant, key] = statistics.fmean(v)
      expected = f'{statistics.fmean(v):.3f} ± {statistics.stdev(v):.3f}'
      assert cells[1 + j].strip('*') == expected, (variant, key)
    assert cells[1 + len(metrics)] == '2/2'
  for j, key in enumerate(metrics):
    best = max(VARIANTS, key=lambda v: means[v, key])
    marked = [v for v in VARIANTS
              if _md_row(markdown, 'Test metrics', v)[1 + j].startswith('**')]
    if means['balanced', key] != means['weighted', key]:
      assert marked == [best], key
  cells = _md_row(markdown, 'Difference to `balanced`', 'weighted')
  assert cells[1] == '2'
  for j, key in enumerate(metrics):
    d = np.subtract(value('weighted', key), value('balanced', key))
    expected = (f'{d.mean():+.3f} ± '
                f'{statistics.stdev(d.tolist()) / math.sqrt(2):.3f}')
    assert cells[2 + j] == expected, key
  recall = _md_row(markdown, 'Test recall per class', 'weighted')
  assert recall[8].strip('*') == (
      f"{statistics.fmean(value('weighted', 'recall_Contempt')):.3f} ± "
      f"{statistics.stdev(value('weighted', 'recall_Contempt')):.3f}")
  assert '`data.sampler=\'uniform\'`' in markdown
  png = (workdir / 'ablation.png').read_bytes()
  assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 20_000


def test_finished_runs_are_skipped(ablated, monkeypatch, capsys):
  config, workdir, _ = ablated
  monkeypatch.setattr(ablate, 'train_one',
                      lambda *a: pytest.fail('a finished run was trained'))
  rows = ablate.run(config, str(workdir))
  assert {r['status'] for r in rows} == {'finished'}
  assert '4 runs; 4 finished' in capsys.readouterr().out


def test_interrupted_run_resumes_and_a_failure_does_not_stop_the_others(
    ablated, tmp_path, capfd):
  config, source, _ = ablated
  workdir = tmp_path / 'ablation'
  shutil.copytree(source, workdir)
  # balanced/seed_0 was killed after its step-4 checkpoint; weighted/seed_1
  # holds a checkpoint and nothing that says what it is, so it fails; the
  # other two are finished.
  interrupted = workdir / 'balanced' / 'seed_0'
  shutil.rmtree(interrupted / 'report')
  for step in (interrupted / 'checkpoints').iterdir():
    if step.name.isdigit() and int(step.name) > 4:
      shutil.rmtree(step)
  (interrupted / 'metrics.jsonl').unlink()
  failing = workdir / 'weighted' / 'seed_1'
  shutil.rmtree(failing)
  (failing / 'checkpoints' / '5').mkdir(parents=True)
  with pytest.raises(RuntimeError, match='1 of 4 runs failed'):
    ablate.run(config, str(workdir))
  out = capfd.readouterr().out
  assert '2 interrupted' in out and '2 finished' in out
  assert 'Resuming from the checkpoint of step 4' in out
  resumed = json.loads((interrupted / 'report' /
                        'test_metrics.json').read_text())
  original = json.loads((source / 'balanced' / 'seed_0' / 'report' /
                         'test_metrics.json').read_text())
  assert resumed['accuracy'] == original['accuracy']
  assert resumed['valence_ccc'] == pytest.approx(original['valence_ccc'],
                                                 abs=1e-6)
  error = (failing / 'error.txt').read_text()
  assert 'has checkpoints but no config.json' in error
  assert 'Traceback' not in error  # the user's mistake, in one line
  rows = {(r['variant'], r['seed']): r
          for r in read_csv(workdir / 'ablation.csv')}
  assert rows['weighted', '1']['status'] == 'failed'
  assert 'has checkpoints but no config.json' in rows['weighted', '1'][
      'error']
  assert rows['weighted', '1']['accuracy'] == ''
  assert _md_row((workdir / 'ablation.md').read_text(), 'Test metrics',
                 'weighted')[1 + len(config.ablate.metrics)] == '1/2'

  # Running again retries the failed run; its error.txt goes.
  shutil.rmtree(failing / 'checkpoints')
  rows = ablate.run(config, str(workdir))
  assert {r['status'] for r in rows} == {'finished'}
  assert not (failing / 'error.txt').exists()


def test_a_run_that_fails_in_training_leaves_no_process_behind(
    ablated, tmp_path):
  """Its Grain workers end with it: none is left, not even as an orphan
  (this process adopts orphans while the ablation runs)."""
  config, source, _ = ablated
  workdir = tmp_path / 'ablation'
  shutil.copytree(source / 'balanced' / 'seed_0',
                  workdir / 'balanced' / 'seed_0')
  config = ablation(config.base, {
      'balanced': {}, 'diverging': {'train.learning_rate': 1e30,
                                    'data.num_workers': 2}}, seeds=(0,))
  before = live_children()
  prctl = ctypes.CDLL(None).prctl
  prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
  try:
    with pytest.raises(RuntimeError, match='1 of 2 runs failed'):
      ablate.run(config, str(workdir))
  finally:
    prctl(36, 0, 0, 0, 0)
  assert live_children() <= before
  error = (workdir / 'diverging' / 'seed_0' / 'error.txt').read_text()
  assert 'FloatingPointError: loss is nan' in error


def test_an_evaluation_beside_a_run_leaves_the_table_to_training(
    ablated, tmp_path):
  """The tables read each run's own test report, whatever was evaluated
  afterwards (another checkpoint, flip TTA)."""
  config, source, rows = ablated
  workdir = tmp_path / 'ablation'
  shutil.copytree(source / 'balanced', workdir / 'balanced')
  run = workdir / 'balanced' / 'seed_0'
  flip = config.base.copy_and_resolve_references()
  flip.eval.tta = 'flip'
  evaluation.evaluate(flip, str(run), 'test', checkpoint_step=4)
  config = tiny_ablation(Path(config.base.data.synthetic.cache_dir))
  config.ablate.collect_only = True
  collected = ablate.run(config, str(workdir))
  want = json.loads((source / 'balanced' / 'seed_0' / 'report' /
                     'test_metrics.json').read_text())
  for key in ('accuracy', 'valence_ccc', 'checkpoint_step', 'train_seconds'):
    assert collected[0][key] == want[key] == rows[0][key], key


def test_collect_only_trains_nothing_and_lists_missing_runs(ablated, tmp_path,
                                                            monkeypatch):
  config, source, _ = ablated
  workdir = tmp_path / 'ablation'
  shutil.copytree(source / 'balanced', workdir / 'balanced')
  config = tiny_ablation(Path(config.base.data.synthetic.cache_dir))
  config.ablate.collect_only = True
  monkeypatch.setattr(ablate, 'train_one',
                      lambda *a: pytest.fail('collect_only trained'))
  rows = ablate.run(config, str(workdir))
  assert [r['status'] for r in rows] == ['finished', 'finished', 'not run',
                                         'not run']
  markdown = (workdir / 'ablation.md').read_text()
  assert _md_row(markdown, 'Test metrics', 'weighted')[1] == '-'
  assert 'Runs not in the tables' in markdown


def test_a_run_started_with_another_config_is_refused(ablated, tmp_path):
  config, source, _ = ablated
  workdir = tmp_path / 'ablation'
  shutil.copytree(source / 'weighted', workdir / 'weighted')
  config = tiny_ablation(Path(config.base.data.synthetic.cache_dir))
  config.base.train.learning_rate = 0.5
  config.base.data.num_threads = 3  # speed only: not a difference
  with pytest.raises(UsageError) as error:
    ablate.run(config, str(workdir))
  message = str(error.value)
  assert str(workdir / 'weighted' / 'seed_0') in message
  assert 'train.learning_rate 0.002 -> 0.5' in message
  assert 'num_threads' not in message
  assert not (workdir / 'ablation.csv').exists()
  # A run finished under other training rules is another recipe too.
  config.base.train.learning_rate = 0.002
  report = workdir / 'weighted' / 'seed_1' / 'report' / 'test_metrics.json'
  saved = json.loads(report.read_text())
  report.write_text(json.dumps({**saved, 'training_rules': 1}))
  with pytest.raises(UsageError, match='seed_1: training_rules 1 -> '
                     f'{steps.TRAINING_RULES}'):
    ablate.run(config, str(workdir))


def test_bad_variants_are_refused_before_any_run(config, tmp_path):
  bad = lambda variants, **kw: ablate.plan(
      ablation(config, variants, **kw), tmp_path)
  with pytest.raises(ValueError, match=r"ablate.variants\['w'\]: "
                     r"'train.class_weight' is not a field.*did you mean "
                     r"'train.class_weights'"):
    bad({'w': {'train.class_weight': 'none'}})
  with pytest.raises(ValueError, match=r"'w'.*train.num_epochs='three'"):
    bad({'w': {'train.num_epochs': 'three'}})
  with pytest.raises(ValueError, match='not a folder name'):
    bad({'a/b': {}})
  with pytest.raises(ValueError, match='unique'):
    bad({'a': {}}, seeds=(0, 0))
  plan = ablate.plan(ablation(config, {'a': {'data.image_size': 40}}),
                     tmp_path)
  # Fields that refer to another follow it (the synthetic set's size).
  assert plan[0].config.data.synthetic.image_size == 40
  assert config.data.image_size == 32  # the base is not changed


@pytest.mark.parametrize('name', sorted(
    p.stem for p in (ROOT / 'configs' / 'ablations').glob('*.py')
    if p.stem != '__init__'))
def test_shipped_ablation_configs_plan(name, tmp_path):
  module = importlib.import_module(f'fer_jax.configs.ablations.{name}')
  for arg in ('synthetic', 'affectnet'):
    config = module.get_config(arg)
    runs = ablate.plan(config, tmp_path)
    assert len(runs) == len(config.ablate.variants) * len(config.ablate.seeds)
    assert len({json.dumps(r.config.to_dict(), sort_keys=True)
                for r in runs}) == len(runs)


def test_main_collects_an_empty_ablation_from_the_command_line(tmp_path):
  run = lambda *args: subprocess.run(
      [sys.executable, 'main.py', *args], cwd=ROOT, capture_output=True,
      text=True, timeout=120)
  result = run('--config=configs/ablations/imbalance.py')
  assert result.returncode != 0 and '--mode=ablate' in result.stderr
  result = run('--mode=ablate',
               '--config=configs/ablations/imbalance.py:affectnet',
               f'--workdir={tmp_path}', '--config.ablate.collect_only=True',
               '--config.base.data.root=/elsewhere',
               '--config.ablate.seeds=(3,4)')
  assert result.returncode == 0, result.stderr[-2000:]
  rows = read_csv(tmp_path / 'ablation.csv')
  assert [(r['seed'], r['status']) for r in rows] == [
      ('3', 'not run'), ('4', 'not run')] * 3
  saved = json.loads((tmp_path / 'ablation_config.json').read_text())
  assert saved['base']['data']['root'] == '/elsewhere'
  assert saved['base']['data']['image_size'] == 224  # the AffectNet base


def test_docs_ten_line_ablation_config_plans(tmp_path):
  readme = (ROOT / 'docs' / 'ablations.md').read_text()
  block = readme.split('An ablation config in ten lines')[1]
  code = block.split('```python\n')[1].split('```')[0]
  assert len([line for line in code.splitlines() if line.strip()]) <= 11
  namespace = {}
  exec(compile(code, 'docs/ablations.md', 'exec'), namespace)  # noqa: S102
  runs = ablate.plan(namespace['get_config'](), tmp_path)
  assert [(r.variant, r.config.model.hidden_size, r.config.model.dropout_rate)
          for r in runs[::3]] == [('linear', 0, 0.0), ('hidden', 256, 0.0),
                                  ('hidden_dropout', 256, 0.3)]


def test_runs_share_a_compilation_cache_unless_one_is_set(tmp_path,
                                                          monkeypatch):
  """Each run's process gets the ablation's compile_cache/ (the seeds of a
  variant compile the same programs), or the user's own cache, and the
  fer_jax it was started from on its path."""
  seen = []

  class Child:
    returncode = 0
    stderr = type('Pipe', (), {'read1': lambda self, n: b''})()

    def __init__(self, command, stderr, env, **options):
      seen.append((command, env, options))

    def __enter__(self):
      return self

    def __exit__(self, *exception):
      return False

  monkeypatch.setattr(ablate.subprocess, 'Popen', Child)
  one = ablate.Run('a', 0, tmp_path / 'a' / 'seed_0',
                   default.get_config())
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
  ablate.train_one(one, tmp_path / 'compile_cache')
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', '/mine')
  ablate.train_one(one, tmp_path / 'compile_cache')
  assert [env['JAX_COMPILATION_CACHE_DIR'] for _, env, _ in seen] == [
      str(tmp_path / 'compile_cache'), '/mine']
  command, env, options = seen[0]
  assert command[1:4] == ['-m', 'fer_jax.cli', '--mode=train']
  assert env['PYTHONPATH'].split(os.pathsep)[0] == str(ROOT)
  # The run ends with the process that holds its lock, even if killed.
  assert callable(options['preexec_fn'])


# The runs as tasks: command lines, locks, several at once.

def _with(config, **ablate_fields):
  """A copy of an ablation config with ablate fields set."""
  config = copy.deepcopy(config)
  for name, value in ablate_fields.items():
    config.ablate[name] = value
  return config


def _read_until(process: subprocess.Popen, text: str) -> None:
  """Reads the process's stdout until a line holds text."""
  for line in process.stdout:
    if text in line:
      return
  raise AssertionError(f'{process.args}: ended without {text!r}')


def _children(pid: int) -> list[int]:
  """The processes whose parent is pid."""
  found = []
  for stat in Path('/proc').glob('[0-9]*/stat'):
    try:
      fields = stat.read_text().rsplit(')', 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == pid:
      found.append(int(stat.parent.name))
  return found


def _interrupt_at_step_4(source: Path, run: Path) -> None:
  """run: a copy of source's run as if killed after its step-4 checkpoint."""
  shutil.copytree(source, run)
  shutil.rmtree(run / 'report')
  for step in (run / 'checkpoints').iterdir():
    if step.name.isdigit() and int(step.name) > 4:
      shutil.rmtree(step)
  (run / 'metrics.jsonl').unlink()


class _Warnings(python_logging.Handler):
  """The warnings fer_jax logs meanwhile."""

  def __init__(self):
    super().__init__(python_logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture(scope='module')
def tasks(ablated, tmp_path_factory):
  """The tiny ablation as tasks, step by step: planned from Python; its
  first two command lines run at once from another folder, while a third
  process comes to the first one's run (the first is stopped meanwhile,
  so that it surely holds it); collect_only; the third line killed with
  SIGKILL as it resumes a run interrupted at step 4; parallel_runs=2 over
  the rest. A dict of what each step left."""
  config, serial, _ = ablated
  workdir = tmp_path_factory.mktemp('tasks')
  elsewhere = tmp_path_factory.mktemp('elsewhere')
  logs = tmp_path_factory.mktemp('task_logs')
  seen = {'workdir': workdir, 'serial': serial}
  assert ablate.run(_with(config, plan_only=True), str(workdir)) == []
  seen['after_plan'] = sorted(p.name for p in workdir.iterdir())
  lines = (workdir / 'commands.txt').read_text().splitlines()
  seen['lines'] = lines

  start = lambda line, name: subprocess.Popen(
      line, shell=True, cwd=elsewhere, stdout=subprocess.PIPE, text=True,
      stderr=open(logs / name, 'w'), start_new_session=True)
  first, second = start(lines[0], 'first'), start(lines[1], 'second')
  _read_until(first, '=== run 1 of 1: balanced, seed 0')
  run = workdir / 'balanced' / 'seed_0'
  seen['holder'] = json.loads((run / 'lock.json').read_text())
  seen['holder_is_first'] = os.getpgid(seen['holder']['pid']) == first.pid
  os.killpg(first.pid, signal.SIGSTOP)
  try:
    before = tree_digest(run)
    seen['third'] = subprocess.run(lines[0], shell=True, cwd=elsewhere,
                                   capture_output=True, text=True,
                                   timeout=300)
    seen['third_left_it'] = tree_digest(run) == before
  finally:
    os.killpg(first.pid, signal.SIGCONT)
  for task in (first, second):
    task.communicate(timeout=300)
  seen['returncodes'] = [first.returncode, second.returncode]
  seen['locks_left'] = sorted(workdir.rglob('lock.json'))

  seen['collected'] = ablate.run(_with(config, collect_only=True),
                                 str(workdir))

  interrupted = workdir / 'balanced' / 'seed_1'
  _interrupt_at_step_4(serial / 'balanced' / 'seed_1', interrupted)
  prctl = ctypes.CDLL(None).prctl
  prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: its orphans come here
  try:
    killed = start(lines[2], 'killed')
    _read_until(killed, 'Resuming from the checkpoint of step 4')
    seen['killed_holder'] = json.loads(
        (interrupted / 'lock.json').read_text())
    trainers = _children(seen['killed_holder']['pid'])
    os.kill(seen['killed_holder']['pid'], signal.SIGKILL)
    killed.communicate(timeout=300)
    seen['trainers_ended'] = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                              for pid in trainers]
  finally:
    prctl(36, 0, 0, 0, 0)
  seen['killed_lock'] = json.loads((interrupted / 'lock.json').read_text())
  seen['killed_status'] = ablate.run_status(ablate.Run(
      'balanced', 1, interrupted, config.base), 2.0)

  warnings = _Warnings()
  python_logging.getLogger('absl').addHandler(warnings)
  try:
    with contextlib.redirect_stdout(io.StringIO()) as out:
      seen['rows'] = ablate.run(_with(config, parallel_runs=2), str(workdir))
  finally:
    python_logging.getLogger('absl').removeHandler(warnings)
  seen['parallel_out'], seen['warnings'] = out.getvalue(), warnings.messages
  return seen


def test_plan_only_writes_a_command_line_per_run_and_an_array_as_long(
    tasks, tmp_path):
  workdir, lines = tasks['workdir'], tasks['lines']
  assert tasks['after_plan'] == ['commands.txt', 'plan_config.json',
                                 'slurm_array.sh']  # nothing trained
  assert len(lines) == 4
  for line, run in zip(lines, ['balanced:0', 'weighted:0', 'balanced:1',
                               'weighted:1']):  # seed by seed
    args = shlex.split(line)
    assert args[0] == 'env' and args[1].split(os.pathsep)[0] == (
        f'PYTHONPATH={ROOT}')
    assert args[2:6] == [sys.executable, '-m', 'fer_jax.cli', '--mode=ablate']
    assert args[-2:] == [f'--config.ablate.only={run}',
                         f'--workdir={workdir}']
  script = (workdir / 'slurm_array.sh').read_text()
  assert '\n#SBATCH --array=0-3\n' in script
  assert '\n#SBATCH --gres=gpu:1\n' in script
  assert '\n##SBATCH --partition=' in script and '\n##SBATCH --time=' in script
  # Task 2 of the array runs line 3 (here an `env` that shows its
  # arguments stands in for the real one).
  (tmp_path / 'env').write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
  (tmp_path / 'env').chmod(0o755)
  shown = subprocess.run(
      ['bash', str(workdir / 'slurm_array.sh')], capture_output=True,
      text=True, check=True, env={**os.environ, 'SLURM_ARRAY_TASK_ID': '2',
                                  'PATH': f"{tmp_path}:{os.environ['PATH']}"})
  assert shown.stdout.splitlines() == shlex.split(lines[2])[1:]


def test_two_task_lines_at_once_and_a_third_process_that_skips_their_run(
    tasks):
  holder, third = tasks['holder'], tasks['third']
  assert tasks['holder_is_first']
  assert holder['host'] == socket.gethostname() and holder['start_time']
  assert third.returncode == 0, third.stderr[-2000:]
  assert (f"skipped  balanced:0: in progress on {holder['host']} "
          f"(pid {holder['pid']})") in third.stdout
  assert tasks['third_left_it']
  assert tasks['returncodes'] == [0, 0]
  assert tasks['locks_left'] == []


def test_collect_only_then_reports_two_finished_and_the_rest_not_run(tasks):
  assert [(r['variant'], r['seed'], r['status'])
          for r in tasks['collected']] == [
      ('balanced', 0, 'finished'), ('balanced', 1, 'not run'),
      ('weighted', 0, 'finished'), ('weighted', 1, 'not run')]


def test_a_task_killed_with_sigkill_leaves_a_stale_lock_taken_over(tasks):
  run = tasks['workdir'] / 'balanced' / 'seed_1'
  holder = tasks['killed_holder']
  # The lock outlived its holder, whose training was killed with it.
  assert tasks['killed_lock'] == holder
  assert tasks['trainers_ended'] == [-signal.SIGKILL]
  assert tasks['killed_status'] == 'interrupted'
  assert any(f"taking over the lock of {holder['host']} (pid "
             f"{holder['pid']}" in m and 'has ended' in m
             for m in tasks['warnings'])
  log = (run / 'train.log').read_text()
  assert 'Resuming from the checkpoint of step' in log
  resumed = json.loads((run / 'report' / 'test_metrics.json').read_text())
  original = json.loads((tasks['serial'] / 'balanced' / 'seed_1' / 'report' /
                         'test_metrics.json').read_text())
  assert resumed['accuracy'] == original['accuracy']
  assert resumed['confusion_matrix'] == original['confusion_matrix']
  assert resumed['valence_ccc'] == pytest.approx(original['valence_ccc'],
                                                 abs=1e-6)


def test_parallel_runs_finish_the_rest_as_the_serial_ablation_did(tasks):
  workdir, out = tasks['workdir'], tasks['parallel_out']
  assert {r['status'] for r in tasks['rows']} == {'finished'}
  for run in ('balanced:1', 'weighted:1'):
    variant, seed = run.split(':')
    log = workdir / variant / f'seed_{seed}' / 'train.log'
    assert f'started  {run}; its output: {log}' in out
    assert re.search(rf'finished {run}: accuracy \d\.\d{{4}} \(', out)
    assert 'epoch 1: train loss' in log.read_text()
  assert out.count('\nstarted  ') == 2
  parallel = read_csv(workdir / 'ablation.csv')
  serial = read_csv(tasks['serial'] / 'ablation.csv')
  skip = ('workdir', 'train_seconds')
  assert [list(row) for row in parallel] == [list(row) for row in serial]
  for ours, theirs in zip(parallel, serial):
    for key in ours:
      if key in skip:
        continue
      if ours[key] != theirs[key]:  # float32 rounding after a resume
        assert float(ours[key]) == pytest.approx(float(theirs[key]),
                                                 abs=1e-6), key


def test_bad_task_settings_are_refused_in_one_line_before_anything(
    data_cache, tmp_path, monkeypatch):
  config = tiny_ablation(data_cache)
  workdir = tmp_path / 'ablation'
  refused = lambda **fields: ablate.run(_with(config, **fields),
                                        str(workdir))
  cases = [
      ({'parallel_runs': 0}, r'^ablate.parallel_runs: 0 is below 1$'),
      ({'devices_per_run': 0}, r'^ablate.devices_per_run: 0 is below 1$'),
      ({'stale_lock_hours': 0.0}, r'^ablate.stale_lock_hours: 0.0 is not'),
      ({'only': 'balanced:0,nope:1'}, r"^ablate.only: 'nope:1': 'nope' is not "
       r'one of the variants balanced, weighted$'),
      ({'only': 'weighted:7'}, r"^ablate.only: 'weighted:7': '7' is not one "
       r'of the seeds 0, 1$'),
      ({'only': 'weighted'}, r"^ablate.only: 'weighted' is not variant:seed"),
      ({'only': 'weighted:1, weighted:1'},
       r"^ablate.only: 'weighted:1' is named twice$"),
      ({'only': 'weighted:1', 'collect_only': True},
       r'^ablate.collect_only trains nothing'),
  ]
  for fields, message in cases:
    with pytest.raises(UsageError, match=message):
      refused(**fields)
  # More GPUs than this host sees (the tests' JAX_PLATFORMS=cpu aside).
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '0,1,2')
  with pytest.raises(UsageError, match=r'^ablate.parallel_runs=2 x '
                     r'ablate.devices_per_run=2 asks for 4 GPUs for 4 runs; '
                     r'this host has 3 \(0,1,2\)$'):
    refused(parallel_runs=2, devices_per_run=2)
  assert not workdir.exists()  # refused at the door


def test_gpus_are_split_between_the_runs_trained_at_once(monkeypatch):
  slots = lambda parallel, per_run, runs, gpus: ablate_processes.device_slots(
      ml_collections.ConfigDict({'parallel_runs': parallel,
                                 'devices_per_run': per_run}), runs, gpus)
  eight = [str(i) for i in range(8)]
  assert slots(8, 1, 9, eight) == eight
  assert slots(4, 2, 9, eight) == ['0,1', '2,3', '4,5', '6,7']
  assert slots(4, 2, 2, eight) == ['0,1', '2,3']  # no more than the runs
  assert slots(1, 1, 9, eight) == [None]  # one at a time: every device
  assert slots(3, 1, 9, []) == [None] * 3  # a CPU host: the cores, shared
  with pytest.raises(UsageError, match='asks for 9 GPUs'):
    slots(3, 3, 9, eight)
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '3,5,-1,6')
  assert ablate_processes.visible_gpus() == ['3', '5']  # CUDA stops at -1
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert ablate_processes.visible_gpus() == []


def test_ctrl_c_stops_every_parallel_run_and_frees_its_folder(
    data_cache, tmp_path, monkeypatch, capsys):
  """Two runs whose training sleeps, each on its own GPU; Ctrl-C comes
  while they run."""
  runs = ablate.plan(tiny_ablation(data_cache), tmp_path)[:2]
  started = []

  def sleeper(one, config_file, compile_cache):
    return ([sys.executable, '-c', 'import time; time.sleep(300)'],
            dict(os.environ))

  real_popen = subprocess.Popen

  def popen(command, **options):
    started.append((real_popen(command, **options), options['env']))
    return started[-1][0]

  def ctrl_c(seconds):
    raise KeyboardInterrupt
  monkeypatch.setattr(ablate_processes, 'child_command', sleeper)
  monkeypatch.setattr(ablate_processes.subprocess, 'Popen', popen)
  monkeypatch.setattr(ablate_processes, 'time', types.SimpleNamespace(
      perf_counter=lambda: 0.0, sleep=ctrl_c))
  with pytest.raises(KeyboardInterrupt):
    ablate_processes.train_parallel(runs, ['0', '1'], tmp_path / 'cache', 2.0,
                                'accuracy')
  assert [env['CUDA_VISIBLE_DEVICES'] for _, env in started] == ['0', '1']
  assert [process.returncode for process, _ in started] == [
      -signal.SIGKILL] * 2
  assert not list(tmp_path.rglob('lock.json'))
  out = capsys.readouterr().out
  for one in runs:
    assert f'started  {one.name} on GPUs' in out
    assert f'stopped  {one.name}; running the ablation again resumes it' in out


def test_a_lock_is_kept_while_its_holder_may_train_and_taken_when_stale(
    tmp_path):
  folder, path = tmp_path / 'run', tmp_path / 'run' / run_lock.LOCK_FILE
  assert run_lock.take(folder, 2.0) is None  # free: taken
  mine = json.loads(path.read_text())
  assert (mine['host'], mine['pid']) == (socket.gethostname(), os.getpid())
  assert run_lock.holder(folder, 2.0) == mine
  run_lock.release(folder)
  assert not path.exists()

  def held_by(**holder):
    path.write_text(json.dumps(holder))
    return run_lock.take(folder, 2.0)
  # Another host's, refreshed 1 h ago: kept; 3 h ago: stale.
  other = {'host': 'elsewhere', 'pid': 1, 'start_time': '2020-01-01'}
  assert held_by(**other) == other
  os.utime(path, (time.time() - 3600,) * 2)
  assert run_lock.take(folder, 2.0) == other
  os.utime(path, (time.time() - 3 * 3600,) * 2)
  assert run_lock.take(folder, 2.0) is None
  taken = json.loads(path.read_text())
  assert (taken['host'], taken['pid']) == (socket.gethostname(), os.getpid())
  run_lock.release(folder)
  # This host's: kept while its process lives (this test's parent), not
  # once the PID has ended or belongs to a process started since.
  parent = {'host': socket.gethostname(), 'pid': os.getppid(),
            'pid_start_ticks': run_lock._start_ticks(os.getppid())}
  assert held_by(**parent) == parent
  assert held_by(**{**parent, 'pid_start_ticks': 1}) is None
  run_lock.release(folder)
  ended = subprocess.Popen(['true'])
  ended.wait()
  assert held_by(host=socket.gethostname(), pid=ended.pid) is None
  # Its holder refreshes it.
  os.utime(path, (time.time() - 3600,) * 2)
  run_lock.refresh_held()
  assert time.time() - path.stat().st_mtime < 60
  run_lock.release(folder)


def test_a_plan_from_python_reads_back_into_the_same_runs(data_cache,
                                                          tmp_path):
  """configs/saved.py reads the plan's config; the fields that follow
  another (the synthetic set's image size) follow it there too."""
  config = ablation(tiny_config(data_cache), {
      'small': {}, 'large': {'data.image_size': 40}}, seeds=(0,))
  ablate.run(_with(config, plan_only=True), str(tmp_path))
  saved = importlib.import_module('fer_jax.configs.saved').get_config(
      str(tmp_path / 'plan_config.json'))
  assert (saved.ablate.plan_only, saved.ablate.only) == (False, '')
  as_json = lambda runs: [ablate.config_rules.as_json(r.config) for r in runs]
  again = ablate.plan(saved, tmp_path)
  assert as_json(again) == as_json(ablate.plan(config, tmp_path))
  assert again[1].config.data.synthetic.image_size == 40


def test_the_command_line_plans_tasks_that_load_its_config(tmp_path):
  """Its --config file and overrides reach every line, with absolute
  paths; the line's own flags load the same config from another folder."""
  data = tmp_path / 'AffectNet'
  data.mkdir()
  workdir = tmp_path / 'ablation'
  result = subprocess.run(
      [sys.executable, 'main.py', '--mode=ablate',
       '--config=configs/ablations/imbalance.py:affectnet',
       f'--workdir={workdir}', '--config.ablate.plan_only=True',
       f'--config.base.data.root={data}', '--config.ablate.seeds=(3,4)',
       '--config.ablate.only=none:4,balanced_sampler:3'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = (workdir / 'commands.txt').read_text().splitlines()
  assert [shlex.split(line)[-2] for line in lines] == [
      '--config.ablate.only=balanced_sampler:3', '--config.ablate.only=none:4']
  config_file = ROOT / 'configs' / 'ablations' / 'imbalance.py'
  assert shlex.split(lines[0])[6:9] == [
      f'--config={config_file}:affectnet',
      f'--config.base.data.root={data}', '--config.ablate.seeds=(3, 4)']
  assert '--array=0-1\n' in (workdir / 'slurm_array.sh').read_text()
  collect = result.stdout.strip().splitlines()[-1].strip()
  assert collect == lines[0].replace(
      '--config.ablate.only=balanced_sampler:3',
      '--config.ablate.collect_only=True')
  done = subprocess.run(collect, shell=True, cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert [(r['seed'], r['status']) for r in read_csv(
      workdir / 'ablation.csv')] == [('3', 'not run'), ('4', 'not run')] * 3
