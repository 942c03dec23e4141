"""--mode=ablate: runs, skips, resumes, records failures and collects."""

import csv
import ctypes
import importlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fer_jax import ablate, evaluation, files, steps
from fer_jax.configs import default
from fer_jax.configs.ablations import ablation
from fer_jax.config_rules import UsageError
from fer_jax.labels import EXPRESSIONS
from tests.conftest import ROOT, live_children, tiny_config

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

    def __init__(self, command, stderr, env):
      seen.append((command, env))

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
  assert [env['JAX_COMPILATION_CACHE_DIR'] for _, env in seen] == [
      str(tmp_path / 'compile_cache'), '/mine']
  command, env = seen[0]
  assert command[1:4] == ['-m', 'fer_jax.cli', '--mode=train']
  assert env['PYTHONPATH'].split(os.pathsep)[0] == str(ROOT)
