"""The train mode end to end: the output contract, resume, divergence."""

import json
import re
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from fer_jax import checkpoints, reporting, train
from tests.conftest import ROOT, command_line

REPORT_KEYS = {'num_examples', 'num_va_examples', 'accuracy',
               'balanced_accuracy', 'macro_f1', 'weighted_f1', 'per_class',
               'confusion_matrix'} | {
                   f'{d}_{m}' for d in ('valence', 'arousal')
                   for m in ('rmse', 'mae', 'pcc', 'ccc', 'sagr')}
SPLIT_KEYS = {'num_examples', 'num_va_examples', 'class_counts',
              'dropped_classes', 'skipped'}


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
  records = reporting.read_jsonl(workdir / 'metrics.jsonl')
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
  assert (workdir / 'splits.npz').exists()
  assert 'total params backbone' in (workdir / 'model_summary.txt').read_text()


def test_best_and_latest_checkpoints_are_kept(trained):
  config, workdir, metrics = trained
  manager = checkpoints.create_manager(workdir, config, read_only=True)
  records = reporting.read_jsonl(workdir / 'metrics.jsonl')
  best = max(records, key=lambda r: r['val_macro_f1'])
  assert manager.best_step() == best['step'] == metrics['checkpoint_step']
  assert manager.latest_step() == records[-1]['step']


def final_params(config, workdir):
  manager = checkpoints.create_manager(workdir, config, read_only=True)
  state, meta, _ = checkpoints.restore(manager, manager.latest_step(),
                                       None)
  return state['params'], meta


def resume_after_kill(trained, tmp_path, **overrides):
  """The trained run as if killed just after its mid-epoch-2 checkpoint,
  then resumed with overrides of data: the old and the resumed records."""
  config, workdir, _ = trained
  resumed = tmp_path / 'resumed'
  shutil.copytree(workdir, resumed)
  records = reporting.read_jsonl(workdir / 'metrics.jsonl')
  # The kill: the last checkpoint and the reports never landed.
  shutil.rmtree(resumed / 'checkpoints' / str(records[-1]['step']))
  shutil.rmtree(resumed / 'report')
  config = config.copy_and_resolve_references()
  config.data.update(overrides)
  train.train_and_evaluate(config, str(resumed))
  return records, resumed


@pytest.mark.parametrize('num_workers', [0, 2])
def test_resume_mid_epoch_matches_uninterrupted(trained, tmp_path, capsys,
                                                num_workers):
  """Same workers: Grain's saved iterator state; others: from the step."""
  config, workdir, _ = trained
  records, resumed = resume_after_kill(trained, tmp_path,
                                       num_workers=num_workers)
  # 9 steps an epoch, checkpoints every 4: the last mid-epoch one is 16.
  assert ('Resuming from the checkpoint of step 16 (step 7 of 9 in epoch 2)'
          in capsys.readouterr().out)
  again = reporting.read_jsonl(resumed / 'metrics.jsonl')
  assert [r['epoch'] for r in again] == [1, 2]
  for key in ('train_loss', 'train_accuracy', 'val_loss'):
    assert again[1][key] == pytest.approx(records[1][key], rel=1e-6), key
  want, _ = final_params(config, workdir)
  got, meta = final_params(config, resumed)
  assert meta['epoch'] == 2
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('field,value', [('log_every_steps', 3),
                                         ('num_epochs', 1)])
def test_finished_run_is_not_trained_again(trained, tmp_path, capsys,
                                           caplog, field, value):
  """Also with fewer epochs than it has trained: nothing is left to do."""
  config, workdir, metrics = trained
  again = tmp_path / 'again'
  shutil.copytree(workdir, again)
  config = config.copy_and_resolve_references()
  old = config.train[field]
  config.train[field] = value
  result = train.train_and_evaluate(config, str(again))
  assert f'train.{field} {old} -> {value}' in caplog.text
  out = capsys.readouterr().out
  assert 'Resuming from the checkpoint of step 18 (the end of epoch 2)' in out
  assert 'Training has finished' in out
  assert len(reporting.read_jsonl(again / 'metrics.jsonl')) == 2
  assert result['accuracy'] == pytest.approx(metrics['accuracy'])


def test_resume_refuses_a_training_split_that_changed(trained, tmp_path):
  config, workdir, _ = trained
  records = reporting.read_jsonl(workdir / 'metrics.jsonl')
  changed = tmp_path / 'changed'
  shutil.copytree(workdir, changed)
  shutil.rmtree(changed / 'checkpoints' / str(records[-1]['step']))
  config = config.copy_and_resolve_references()
  config.data.val_fraction = 0.3  # other images in train than checkpointed
  with pytest.raises(ValueError, match='the training split differs from '
                     'the one this run was checkpointed with'):
    train.train_and_evaluate(config, str(changed))


def test_diverging_loss_stops_and_keeps_the_last_checkpoint(trained,
                                                            tmp_path):
  config, workdir, _ = trained
  diverged = tmp_path / 'diverged'
  shutil.copytree(workdir, diverged)
  config = config.copy_and_resolve_references()
  config.train.num_epochs = 3
  config.train.learning_rate = 1e30
  with pytest.raises(FloatingPointError, match='loss is (nan|inf) at epoch 3'):
    train.train_and_evaluate(config, str(diverged))
  manager = checkpoints.create_manager(diverged, config, read_only=True)
  assert manager.latest_step() == reporting.read_jsonl(
      workdir / 'metrics.jsonl')[-1]['step']
  assert len(reporting.read_jsonl(diverged / 'metrics.jsonl')) == 2


def test_efficientnet_b0_trains_and_evaluates_end_to_end(config, tmp_path,
                                                         capsys):
  config.model.name = 'efficientnet_b0'
  config.model.dropout_rate = 0.2
  config.train.num_epochs = 1
  metrics = train.train_and_evaluate(config, str(tmp_path))
  assert 'params backbone 4,007,548' in capsys.readouterr().out
  report = json.loads((tmp_path / 'report' / 'test_metrics.json').read_text())
  assert report['accuracy'] == pytest.approx(metrics['accuracy'])
  assert sum(report['per_class'][n]['support'] for n in report['per_class']) \
      == config.data.synthetic.num_val
  assert 'stage7_0/dw_conv/kernel' in (tmp_path / 'model_summary.txt'
                                       ).read_text()


def test_sigkill_mid_epoch_then_restart_matches_uninterrupted(trained,
                                                              tmp_path):
  """main.py killed with SIGKILL in epoch 2, after a mid-epoch checkpoint."""
  config, workdir, metrics = trained
  killed = tmp_path / 'killed'
  command = command_line(config, killed)
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  # Checkpoint 12 is step 3 of 9 in epoch 2; kill as soon as it lands.
  deadline = time.monotonic() + 300
  while not (killed / 'checkpoints' / '12').exists():
    assert process.poll() is None, 'the run ended before step 12'
    assert time.monotonic() < deadline, 'no checkpoint 12 in 5 minutes'
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (killed / 'report' / 'test_metrics.json').exists()
  restarted = subprocess.run(command, cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
  assert restarted.returncode == 0, restarted.stderr[-3000:]
  assert re.search(r'Resuming from the checkpoint of step 1[26] \(step [37] '
                   r'of 9 in epoch 2\)', restarted.stdout), restarted.stdout
  report = json.loads((killed / 'report' / 'test_metrics.json').read_text())
  assert report['accuracy'] == pytest.approx(metrics['accuracy'], abs=1e-9)
  assert report['valence_ccc'] == pytest.approx(metrics['valence_ccc'],
                                                abs=1e-6)
  want, _ = final_params(config, workdir)
  got, _ = final_params(config, killed)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
