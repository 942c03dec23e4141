"""The train mode end to end: the output contract, resume, refusals,
crash safety, divergence and clean-up."""

import json
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from fer_jax import checkpoints, files, steps, training
from fer_jax.config_rules import UsageError
from tests.conftest import ROOT, command_line, live_children, tree_digest

REPORT_KEYS = {'num_examples', 'num_va_examples', 'accuracy',
               'balanced_accuracy', 'macro_f1', 'weighted_f1', 'per_class',
               'confusion_matrix'} | {
                   f'{d}_{m}' for d in ('valence', 'arousal')
                   for m in ('rmse', 'mae', 'pcc', 'ccc', 'sagr')}
SPLIT_KEYS = {'num_examples', 'num_va_examples', 'class_counts',
              'dropped_classes', 'skipped'}
# metrics.jsonl fields that time the run rather than describe its numbers.
TIMING = ('images_per_sec', 'train_seconds')


def test_run_writes_every_file_of_the_contract(trained):
  config, workdir, metrics = trained
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['data']['image_size'] == config.data.image_size
  report = json.loads((workdir / 'report' / 'test_metrics.json').read_text())
  assert REPORT_KEYS <= set(report)
  assert report['num_examples'] == config.data.synthetic.num_val
  assert np.array(report['confusion_matrix']).shape == (8, 8)
  assert set(report['per_class']['Contempt']) == {'precision', 'recall',
                                                 'f1', 'support'}
  assert report['accuracy'] == pytest.approx(metrics['accuracy'])
  data_report = json.loads((workdir / 'data_report.json').read_text())
  for split in ('train', 'val', 'test'):
    assert SPLIT_KEYS <= set(data_report[split])
  assert sum(data_report['train']['class_counts']) + sum(
      data_report['val']['class_counts']) == config.data.synthetic.num_train
  records = files.read_jsonl(workdir / 'metrics.jsonl')
  assert [r['epoch'] for r in records] == [1, 2]
  for key in ('step', 'train_loss', 'train_accuracy', 'val_loss',
              'val_accuracy', 'val_macro_f1', 'learning_rate',
              'images_per_sec'):
    assert all(np.isfinite(r[key]) for r in records), key
  events = b''.join(p.read_bytes()
                    for p in (workdir / 'tb').glob('events.out.tfevents.*'))
  assert b'val/macro_f1' in events and b'train/loss' in events
  # The sample images with their predictions, once per epoch, as PNGs.
  assert events.count(b'val/samples') == 2 and b'\x89PNG' in events
  for name in ('confusion_matrix.png', 'curves.png', 'va_scatter.png'):
    assert (workdir / 'report' / name).stat().st_size > 10_000
  # Paths relative to the data root, with the labels they had.
  with np.load(workdir / 'splits.npz') as splits:
    assert not splits['train'][0].startswith('/')
    assert len(splits['train']) == len(splits['train_labels']) == \
        data_report['train']['num_examples']
  assert 'total params backbone' in (workdir / 'model_summary.txt').read_text()
  # No temporary files of the atomic writes are left.
  assert not [p for p in workdir.rglob('.*.tmp')]


def test_best_and_latest_checkpoints_are_kept(trained):
  config, workdir, metrics = trained
  manager = checkpoints.create_manager(workdir, config, read_only=True)
  records = files.read_jsonl(workdir / 'metrics.jsonl')
  best = max(records, key=lambda r: r['val_macro_f1'])
  assert checkpoints.best_step(manager, config.train) == best['step'] == \
      metrics['checkpoint_step']
  assert manager.latest_step() == records[-1]['step']


def final_params(config, workdir):
  manager = checkpoints.create_manager(workdir, config, read_only=True)
  state, meta, _ = checkpoints.restore(manager, manager.latest_step(),
                                       None)
  return state['params'], meta


def assert_same_params(config, want_dir, got_dir):
  want, _ = final_params(config, want_dir)
  got, meta = final_params(config, got_dir)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
  return meta


def assert_same_records(want_dir, got_dir):
  """metrics.jsonl equal in every field but the timings."""
  strip = lambda path: [{k: v for k, v in r.items() if k not in TIMING}
                        for r in files.read_jsonl(path / 'metrics.jsonl')]
  assert strip(got_dir) == strip(want_dir)


def killed_copy(trained, tmp_path, name='resumed', keep_last=False):
  """The trained run as if killed just after its mid-epoch-2 checkpoint:
  the last checkpoint (unless keep_last) and the report never landed."""
  _, workdir, _ = trained
  copy = tmp_path / name
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / 'report')
  if not keep_last:
    last = files.read_jsonl(workdir / 'metrics.jsonl')[-1]['step']
    shutil.rmtree(copy / 'checkpoints' / str(last))
  return copy


@pytest.mark.parametrize('num_workers', [0, 2])
def test_resume_mid_epoch_matches_uninterrupted(trained, tmp_path, capsys,
                                                monkeypatch, num_workers):
  """Same workers: Grain's saved iterator state; others: from the step.
  Another worker count is an allowed change, logged in the workdir. The
  epoch's metrics.jsonl line is there before its checkpoint is saved."""
  config, workdir, _ = trained
  resumed = killed_copy(trained, tmp_path)
  # What a write killed midway leaves: removed at the next start.
  leftover = resumed / '.metrics.jsonl.x1y2z3.tmp'
  leftover.write_text('{"step": 9')
  config = config.copy_and_resolve_references()
  config.data.num_workers = num_workers
  save, lines_at_epoch_ends = checkpoints.save, []

  def recording_save(manager, step, state, meta, data, metrics):
    if metrics is not None:
      lines_at_epoch_ends.append(
          [r['step'] for r in files.read_jsonl(resumed / 'metrics.jsonl')])
    save(manager, step, state, meta, data, metrics)
  monkeypatch.setattr(checkpoints, 'save', recording_save)
  training.train_and_evaluate(config, str(resumed))
  assert lines_at_epoch_ends == [[9, 18]]
  # 9 steps an epoch, checkpoints every 4: the last mid-epoch one is 16.
  assert ('Resuming from the checkpoint of step 16 (step 7 of 9 in epoch 2)'
          in capsys.readouterr().out)
  assert_same_records(workdir, resumed)
  assert not leftover.exists()
  assert assert_same_params(config, workdir, resumed)['step'] == 18
  changes = files.read_jsonl(resumed / 'config_changes.jsonl')
  assert [c['changes'] for c in changes] == (
      [{'data.num_workers': [0, 2]}] if num_workers else [])
  if changes:
    assert changes[0]['time'].startswith(time.strftime('%Y-'))


def test_finished_run_shows_its_report_and_writes_nothing(trained, tmp_path,
                                                         capsys):
  """Fewer epochs and another log interval are allowed: nothing to do.
  More epochs would change the record: refused."""
  config, workdir, metrics = trained
  again = tmp_path / 'again'
  shutil.copytree(workdir, again)
  before = tree_digest(again)
  config = config.copy_and_resolve_references()
  config.train.num_epochs = 1
  config.train.log_every_steps = 3
  result = training.train_and_evaluate(config, str(again))
  assert 'finished (2 epochs)' in capsys.readouterr().out
  assert result['accuracy'] == metrics['accuracy']
  config.train.num_epochs = 3
  with pytest.raises(UsageError, match='finished after 2 epochs'):
    training.train_and_evaluate(config, str(again))
  assert tree_digest(again) == before


@pytest.mark.parametrize('field,value,message', [
    # The EfficientNet protocol's hazard: another hold-out, part of which
    # the checkpoint trained on.
    ('data.val_fraction', 0.3, 'data.val_fraction 0.2 -> 0.3'),
    ('model.va_activation', 'none', "model.va_activation 'tanh' -> 'none'"),
    ('train.va_loss', 'ccc', "train.va_loss 'mse' -> 'ccc'"),
    # The cosine schedule decays over all epochs.
    ('train.num_epochs', 3, 'train.num_epochs 2 -> 3'),
])
def test_resume_with_another_meaning_is_refused_and_changes_nothing(
    trained, tmp_path, field, value, message):
  config, _, _ = trained
  resumed = killed_copy(trained, tmp_path)
  before = tree_digest(resumed)
  config = config.copy_and_resolve_references()
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(UsageError, match=f'another config.*{message}'):
    training.train_and_evaluate(config, str(resumed))
  assert tree_digest(resumed) == before


def test_resume_under_other_training_rules_is_refused(trained, tmp_path,
                                                     monkeypatch):
  """A checkpoint of rules 2 is not continued by a fer_jax of rules 3."""
  config, _, metrics = trained
  assert metrics['training_rules'] == steps.TRAINING_RULES
  resumed = killed_copy(trained, tmp_path)
  before = tree_digest(resumed)
  monkeypatch.setattr(steps, 'TRAINING_RULES', steps.TRAINING_RULES + 1)
  with pytest.raises(UsageError, match=r'step \d+ was trained under training '
                     f'rules {metrics["training_rules"]} and this fer_jax '
                     f'trains under rules {steps.TRAINING_RULES}'):
    training.train_and_evaluate(config, str(resumed))
  assert tree_digest(resumed) == before


def test_resume_refuses_data_that_differs_from_the_recorded_split(
    trained, tmp_path):
  config, _, _ = trained
  resumed = killed_copy(trained, tmp_path)
  with np.load(resumed / 'splits.npz') as saved:
    arrays = dict(saved)
  arrays['train_labels'] = np.roll(arrays['train_labels'], 1)
  files.write_npz(resumed / 'splits.npz', **arrays)
  before = tree_digest(resumed)
  with pytest.raises(UsageError, match='data differs from the splits this '
                     'run recorded.*train: the same images with other'):
    training.train_and_evaluate(config, str(resumed))
  assert tree_digest(resumed) == before


def test_moved_data_and_a_deleted_init_from_file_still_resume(
    trained, tmp_path):
  """The record holds paths below the data root, and a checkpoint holds
  every weight: neither the data's folder nor model.init_from's file has
  to stay where the run started."""
  config, workdir, _ = trained
  resumed = killed_copy(trained, tmp_path)
  saved = json.loads((resumed / 'config.json').read_text())
  saved['model']['init_from'] = str(tmp_path / 'deleted.safetensors')
  (resumed / 'config.json').write_text(json.dumps(saved))
  moved = tmp_path / 'moved'
  source = config.data.synthetic.cache_dir
  shutil.copytree(source, moved, ignore=shutil.ignore_patterns('index'))
  config = config.copy_and_resolve_references()
  config.model.init_from = saved['model']['init_from']
  config.data.synthetic.cache_dir = str(moved)
  config.data.index_cache_dir = str(moved / 'index')
  training.train_and_evaluate(config, str(resumed))
  assert_same_params(config, workdir, resumed)
  from fer_jax import evaluation
  result = evaluation.evaluate(config, str(resumed), 'val')
  assert result['split_differs_from_training'] is None


def test_unreadable_latest_checkpoint_falls_back_to_the_previous(
    trained, tmp_path, caplog):
  config, workdir, _ = trained
  resumed = killed_copy(trained, tmp_path, keep_last=True)
  for path in (resumed / 'checkpoints' / '18' / 'state').rglob('*'):
    if path.is_file():
      path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
  training.train_and_evaluate(config, str(resumed))
  assert 'checkpoints/18 is unreadable' in caplog.text
  assert (resumed / 'checkpoints_unreadable' / '18').is_dir()
  assert_same_records(workdir, resumed)
  assert_same_params(config, workdir, resumed)
  # With none readable, the error names the folder.
  broken = killed_copy(trained, tmp_path, 'broken')
  for path in (broken / 'checkpoints').glob('*/meta/*'):
    path.write_text('{')
  with pytest.raises(UsageError, match=f"{broken / 'checkpoints'}: no "
                     'checkpoint is complete'):
    training.train_and_evaluate(config, str(broken))


def test_tied_validation_keeps_the_first_best_everywhere(config, tmp_path):
  """val_num_examples is the same every epoch: a tie, whose earliest
  epoch is the best in the progress, the checkpoints kept and the report.
  With train.num_sample_images 0 (no TensorBoard samples; it divided by
  zero once)."""
  config.train.best_metric = 'val_num_examples'
  config.train.num_sample_images = 0
  config.train.keep_checkpoints = 1
  metrics = training.train_and_evaluate(config, str(tmp_path))
  assert metrics['best_epoch'] == 1 and metrics['checkpoint_step'] == 9
  manager = checkpoints.create_manager(tmp_path, config, read_only=True)
  assert sorted(manager.all_steps()) == [9, 18]
  assert checkpoints.best_step(manager, config.train) == 9


def test_diverging_loss_stops_keeps_the_last_checkpoint_and_its_workers(
    trained, tmp_path):
  """The Grain worker processes end with the failed run."""
  config, workdir, _ = trained
  diverged = tmp_path / 'diverged'
  shutil.copytree(workdir, diverged)
  shutil.rmtree(diverged / 'report')
  # A run whose learning rate blows up in its third epoch.
  saved = json.loads((diverged / 'config.json').read_text())
  saved['train'].update(learning_rate=1e38, num_epochs=3)
  (diverged / 'config.json').write_text(json.dumps(saved))
  config = config.copy_and_resolve_references()
  config.train.num_epochs = 3
  config.train.learning_rate = 1e38
  config.data.num_workers = 2
  before = live_children()
  with pytest.raises(FloatingPointError, match='loss is (nan|inf) at epoch '
                     '3') as failure:
    training.train_and_evaluate(config, str(diverged))
  # Closed by the loop itself, not by the garbage collector: the failure's
  # traceback, held here as a caller would while handling it, keeps every
  # object of the loop alive.
  assert failure.tb is not None and live_children() <= before
  # The checkpoint that found the loss not finite was not saved; those
  # before it stay (step 18 and, where the loss was still finite, later).
  failed_at = int(re.search(r'step (\d+)', str(failure.value)).group(1))
  manager = checkpoints.create_manager(diverged, config, read_only=True)
  assert 18 <= manager.latest_step() < failed_at
  assert len(files.read_jsonl(diverged / 'metrics.jsonl')) == 2


def _wait(process, condition, timeout=300.0) -> bool:
  """Polls condition() until true (True) or the process ends (False)."""
  deadline = time.monotonic() + timeout
  while not condition():
    if process.poll() is not None:
      return False
    assert time.monotonic() < deadline, 'nothing happened in 5 minutes'
    time.sleep(0.002)
  return True


def _changed_since(folder: Path, since: float) -> bool:
  """Whether a file in folder was written after `since`. A file listed
  may be gone when looked at: an atomic write renames its temporary file."""
  for path in folder.glob('*'):
    try:
      if path.stat().st_mtime > since:
        return True
    except FileNotFoundError:
      continue
  return False


def test_killed_at_random_moments_ends_as_if_never_killed(trained, tmp_path):
  """main.py killed with SIGKILL at 5 seeded random moments (writing its
  record, saving a checkpoint, right after a metrics.jsonl line, writing
  the report, twice), restarted each time, ends as the uninterrupted run
  did. Each kind of moment once: every kill costs a process start."""
  config, workdir, metrics = trained
  run = tmp_path / 'killed'
  command = command_line(config, run)
  report = run / 'report'
  saving = lambda: any((run / 'checkpoints').glob('*.orbax-checkpoint-tmp*'))
  lines = lambda: len(files.read_jsonl(run / 'metrics.jsonl'))
  reporting = lambda since: (not (report / 'test_metrics.json').exists() and
                             _changed_since(report, since))
  rng = random.Random(0)
  moments = ['record', 'save', 'metrics', 'report', 'report']
  seen = []
  for moment in moments:
    started = time.time()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    before = lines()
    trigger = {'record': (run / 'model_summary.txt').exists,
               'save': saving,
               'metrics': lambda: lines() > before,
               'report': lambda: reporting(started)}[moment]
    if _wait(process, trigger):
      time.sleep(rng.uniform(0, 0.05))
      seen.append('saving' if saving() else
                  'reporting' if reporting(started) else 'other')
      process.kill()
    process.wait()
  finished = subprocess.run(command, cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
  assert finished.returncode == 0, finished.stderr[-3000:]
  assert len(seen) >= 4, seen  # the last may find the run finished
  assert 'saving' in seen and 'reporting' in seen, seen
  assert_same_records(workdir, run)
  assert_same_params(config, workdir, run)
  result = json.loads((report / 'test_metrics.json').read_text())
  assert result['accuracy'] == metrics['accuracy']
  assert result['valence_ccc'] == pytest.approx(metrics['valence_ccc'],
                                                abs=1e-6)


def test_images_per_second_counts_finished_steps_only():
  """The progress bar's rate is over the window between two marks (each
  after a step has finished), the epoch's from the first mark on: steps
  dispatched but not finished, and the first step's compile, count
  nowhere."""
  rates = training.StepRates(batch_size=32)
  assert not rates.started and rates.window is None and rates.epoch() is None
  rates.mark(1, now=100.0)  # the first step, compile included, has run
  assert rates.started and rates.window is None and rates.epoch() is None
  rates.mark(10, now=104.5)  # 9 steps of 32 images in 4.5 s
  assert rates.window == pytest.approx(64.0)
  rates.mark(20, now=106.5)  # 10 steps in 2 s
  assert rates.window == pytest.approx(160.0)
  assert rates.epoch() == pytest.approx(19 * 32 / 6.5)
