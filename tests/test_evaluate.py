"""--mode=evaluate on a finished run."""

import json

import pytest

from fer_jax import evaluate, reporting


def test_evaluate_reproduces_the_test_report_of_training(trained):
  config, workdir, metrics = trained
  result = evaluate.evaluate(config, str(workdir), 'test')
  assert result['accuracy'] == pytest.approx(metrics['accuracy'])
  assert result['valence_ccc'] == pytest.approx(metrics['valence_ccc'],
                                                abs=1e-6)
  assert result['checkpoint_step'] == metrics['checkpoint_step']


def test_evaluate_other_split_and_step_writes_its_report(trained):
  config, workdir, _ = trained
  first = reporting.read_jsonl(workdir / 'metrics.jsonl')[0]
  result = evaluate.evaluate(config, str(workdir), 'val',
                             checkpoint_step=first['step'])
  saved = json.loads((workdir / 'report' / 'val_metrics.json').read_text())
  assert saved['checkpoint_step'] == first['step'] == result['checkpoint_step']
  assert saved['num_examples'] == first['val_num_examples']
  assert saved['accuracy'] == pytest.approx(first['val_accuracy'])
  assert (workdir / 'report' / 'val_confusion_matrix.png').exists()


def test_evaluate_uses_the_trained_model_settings(trained):
  # A command line that differs in model or image size still evaluates the
  # checkpoint as it was trained.
  config, workdir, metrics = trained
  other = config.copy_and_resolve_references()
  other.model.va_activation = 'none'
  other.data.image_size = 48
  other.data.validation = 'released'  # would swap val and test
  other.train.optimizer = 'sgd'       # another optimiser state to restore
  other.train.num_epochs = 1
  result = evaluate.evaluate(other, str(workdir), 'test')
  assert result['accuracy'] == pytest.approx(metrics['accuracy'])


def test_unknown_split_and_step_are_named(trained):
  config, workdir, _ = trained
  with pytest.raises(ValueError, match="--split: 'dev'"):
    evaluate.evaluate(config, str(workdir), 'dev')
  with pytest.raises(ValueError, match='--checkpoint_step: 7 not in'):
    evaluate.evaluate(config, str(workdir), 'test', checkpoint_step=7)
