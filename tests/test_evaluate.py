"""--mode=evaluate on a finished run: beside its record, never over it."""

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import fer_jax
from fer_jax import (data, evaluation, files, inference, models, predict,
                     steps, workdir as workdir_lib)
from fer_jax.config_rules import UsageError
from fer_jax.data import pipeline
from fer_jax.labels import EXPRESSIONS
from tests.conftest import NUM_DEVICES, ROOT, tree_digest
from tests.test_label_spaces import RAFDB, write_rafdb


def test_evaluate_reproduces_the_test_report_of_training(finished):
  config, workdir, metrics = finished
  result = evaluation.evaluate(config, str(workdir), 'test')
  assert result['accuracy'] == pytest.approx(metrics['accuracy'])
  assert result['valence_ccc'] == pytest.approx(metrics['valence_ccc'],
                                                abs=1e-6)
  assert result['checkpoint_step'] == metrics['checkpoint_step']
  folder = (workdir / 'report' / 'eval' /
            f"test-step{metrics['checkpoint_step']}")
  saved = json.loads((folder / 'test_metrics.json').read_text())
  assert saved['accuracy'] == result['accuracy']
  assert saved['split_differs_from_training'] is None
  # Again: a folder of its own, the first one kept.
  evaluation.evaluate(config, str(workdir), 'test')
  assert (folder.parent / f'{folder.name}.2' / 'test_metrics.json').exists()
  assert json.loads((folder / 'test_metrics.json').read_text()) == saved


def test_evaluate_other_split_and_step_writes_its_report(finished):
  config, workdir, _ = finished
  first = files.read_jsonl(workdir / 'metrics.jsonl')[0]
  result = evaluation.evaluate(config, str(workdir), 'val',
                             checkpoint_step=first['step'])
  folder = workdir / 'report' / 'eval' / f"val-step{first['step']}"
  saved = json.loads((folder / 'val_metrics.json').read_text())
  assert saved['checkpoint_step'] == first['step'] == result['checkpoint_step']
  assert saved['num_examples'] == first['val_num_examples']
  assert saved['accuracy'] == pytest.approx(first['val_accuracy'])
  assert (folder / 'confusion_matrix.png').exists()
  assert json.loads((folder / 'data_report.json').read_text())['val'][
      'num_examples'] == saved['num_examples']


def test_evaluate_and_predict_leave_the_record_as_training_wrote_it(
    finished):
  """The record byte for byte, with --checkpoint_step and flip TTA too."""
  config, workdir, metrics = finished
  before = tree_digest(workdir)
  flip = config.copy_and_resolve_references()
  flip.eval.tta = 'flip'
  first = files.read_jsonl(workdir / 'metrics.jsonl')[0]['step']
  result = evaluation.evaluate(flip, str(workdir), 'test',
                             checkpoint_step=first)
  splits, _ = data.load_splits(config)
  output = predict.predict(flip, str(workdir), splits['test'].paths[0])
  name = Path(splits['test'].paths[0]).name
  assert output == (workdir / 'report' / 'predict' /
                    f'{name}-step{metrics["checkpoint_step"]}-flip' /
                    'predictions.csv')
  assert tree_digest(workdir, skip=('report/eval', 'report/predict')) == \
      before
  folder = workdir / 'report' / 'eval' / f'test-step{first}-flip'
  assert json.loads((folder / 'test_metrics.json').read_text())[
      'accuracy'] == result['accuracy']
  assert json.loads((folder / 'test_metrics.json').read_text())['tta'] == \
      'flip'


def test_evaluate_uses_the_trained_model_settings_and_data(finished):
  # A command line that differs in model, image size or data still
  # evaluates the checkpoint as it was trained, on the run's own data: a
  # config's data section is not read, only data set explicitly.
  config, workdir, metrics = finished
  other = config.copy_and_resolve_references()
  other.model.va_activation = 'none'
  other.data.image_size = 48
  other.data.validation = 'released'  # would swap val and test
  other.data.layout, other.data.root = 'folders', str(workdir / 'none')
  other.train.optimizer = 'sgd'       # another optimiser state to restore
  other.train.num_epochs = 1
  result = evaluation.evaluate(other, str(workdir), 'test')
  assert result['accuracy'] == pytest.approx(metrics['accuracy'])
  assert result['data_set'] == 'synthetic'
  assert result['data_differs_from_training'] == {}


def test_explicit_data_fields_win_and_are_named(finished):
  """data.validation='released' given: the test split is then the held-out
  part of train_set, training's validation images; the report names the
  field, and what training had."""
  config, workdir, _ = finished
  first = files.read_jsonl(workdir / 'metrics.jsonl')[0]
  result = evaluation.evaluate(config, str(workdir), 'test',
                               checkpoint_step=first['step'],
                               data={'validation': 'released',
                                     'on_error': 'raise'})  # the run's
  assert result['data_differs_from_training'] == {
      'data.validation': ['holdout', 'released']}
  assert result['num_examples'] == first['val_num_examples']
  assert result['accuracy'] == pytest.approx(first['val_accuracy'])
  saved = json.loads((workdir / 'report' / 'eval' / f"test-step{first['step']}"
                      / 'test_metrics.json').read_text())
  assert saved['data_differs_from_training'] == {
      'data.validation': ['holdout', 'released']}


def test_the_runs_data_includes_the_changes_its_sessions_logged(finished):
  """A resumed session that changed a data field (a data set moved to
  another root, say) logged it: an evaluation reads the latest value."""
  _, workdir, _ = finished
  files.append_jsonl(workdir / workdir_lib.CHANGE_LOG, {
      'time': '2025-01-01T00:00:00+00:00',
      'changes': {'data.on_error': ['raise', 'skip'],
                  'train.num_epochs': [2, 3]}})
  config, changed = inference.evaluation_config(None, workdir, {})
  assert config.data.on_error == 'skip' and changed == {}
  assert config.train.num_epochs == 2  # config.json's: not data


@pytest.mark.parametrize('data, message', [
    ({'face_margin': 0.3}, 'data.face_margin: 0.3 given, but the model was '
     'trained on faces made with 0.1; an evaluation makes faces as its '
     'training did'),
    ({'image_size': 48}, 'data.image_size: 48 given, but the model was '
     'trained on faces made with 32'),
    ({'mean_rgb': (0.5, 0.5, 0.5)}, r'data.mean_rgb: \[0.5, 0.5, 0.5\] given'),
    ({'augment.flip': False}, 'data.augment.flip: a training setting'),
    ({'sampler': 'uniform'}, 'data.sampler: a training setting'),
    ({'synthetic.regenerate': True}, 'data.synthetic.regenerate: an '
     "evaluation reads the run's data set"),
    ({'shuffle': True}, "data.shuffle: not a data field of this run's "
     'config'),
    ({'classes': 'Happy,Bored'}, "data.classes: 'Bored' is not an "
     'expression')])
def test_data_fields_an_evaluation_cannot_take_are_refused(trained, data,
                                                           message):
  config, workdir, _ = trained
  with pytest.raises(UsageError, match=message):
    evaluation.evaluate(config, str(workdir), 'test', data=data)


def test_main_refuses_an_explicit_face_field_in_one_line(trained, tmp_path):
  """--config.data.<field>= reaches evaluate: a face margin the model was
  not trained with is refused, not silently replaced by the run's."""
  _, workdir, _ = trained
  run = subprocess.run(
      [sys.executable, str(ROOT / 'main.py'), '--mode=evaluate',
       f'--workdir={workdir}', '--config.data.face_margin=0.3'],
      cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert run.returncode == 1, run.stderr[-2000:]
  assert run.stderr.strip().splitlines()[-1] == (
      'fer_jax: data.face_margin: 0.3 given, but the model was trained on '
      'faces made with 0.1; an evaluation makes faces as its training did '
      '(data.face_margin, data.image_size, data.mean_rgb, data.std_rgb come '
      'from the run)')


def test_the_old_call_warns_and_the_new_one_scores_the_runs_data(finished):
  config, workdir, _ = finished
  first = files.read_jsonl(workdir / 'metrics.jsonl')[0]
  with pytest.warns(DeprecationWarning, match=r'fer_jax.evaluate\(config, '
                    r'workdir, ...\) is deprecated'):
    old = fer_jax.evaluate(config, str(workdir), 'val',
                           checkpoint_step=first['step'])
  new = fer_jax.evaluate(str(workdir), 'val', first['step'])
  assert old['accuracy'] == new['accuracy'] == pytest.approx(
      first['val_accuracy'])
  flip = fer_jax.evaluate(str(workdir), split='val', tta='flip',
                          checkpoint_step=first['step'])
  assert flip['tta'] == 'flip' and new['tta'] == 'none'


def test_unknown_split_step_and_workdir_are_named(trained, tmp_path):
  config, workdir, _ = trained
  with pytest.raises(UsageError, match="--split: 'dev'"):
    evaluation.evaluate(config, str(workdir), 'dev')
  with pytest.raises(UsageError, match='--checkpoint_step: 7 not in'):
    evaluation.evaluate(config, str(workdir), 'test', checkpoint_step=7)
  with pytest.raises(UsageError, match='config.json: not found'):
    evaluation.evaluate(config, str(tmp_path / 'nowhere'), 'test')


def test_flip_tta_averages_the_image_and_its_mirror(config):
  """On a freshly initialised model, whose outputs differ under a mirror."""
  records = data.load_splits(config)[0]['test'].subset(np.arange(16))
  batch = next(pipeline.eval_batches(records, config, NUM_DEVICES))
  model = models.create_model(config.model, axis_name=steps.AXIS)
  tx = steps.create_optimizer(config.train, lambda step: 0.0)
  state = steps.replicate(steps.create_train_state(
      model, tx, config.data.image_size, config.train.seed))
  _, p_plain = steps.pmap_steps(model, tx, config)
  flip_config = config.copy_and_resolve_references()  # steps trace lazily
  flip_config.eval.tta = 'flip'
  _, p_flip = steps.pmap_steps(model, tx, flip_config)
  flipped = dict(batch, image=batch['image'][:, :, :, ::-1])
  plain, mirrored, tta = (jax.device_get(p(state, b)) for p, b in (
      (p_plain, batch), (p_plain, flipped), (p_flip, batch)))
  assert not np.allclose(plain['probs'], mirrored['probs'], atol=1e-3)
  np.testing.assert_allclose(tta['probs'],
                             (plain['probs'] + mirrored['probs']) / 2,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tta['va'], (plain['va'] + mirrored['va']) / 2,
                             rtol=1e-5, atol=1e-6)
  expected_nll = -np.log(np.take_along_axis(
      tta['probs'].reshape(-1, 8), batch['label'].reshape(-1, 1), 1)).sum()
  assert float(tta['sums']['ce'][0]) == pytest.approx(expected_nll, rel=1e-4)


def test_summary_page_holds_the_report_and_links_existing_figures(trained):
  _, workdir, metrics = trained
  page = (workdir / 'report' / 'summary.md').read_text()
  assert f"| {metrics['accuracy']:.4f} | {metrics['balanced_accuracy']:.4f}"\
      in page
  assert f"| valence | {metrics['valence_rmse']:.4f} |" in page
  for name, row in metrics['per_class'].items():
    assert (f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | "
            f"{row['f1']:.4f} | {row['support']} |") in page
  links = re.findall(r'!\[[^]]*\]\(([^)]+)\)', page)
  assert set(links) == {'confusion_matrix.png', 'va_scatter.png',
                        'curves.png'}
  for link in links:
    assert (workdir / 'report' / link).stat().st_size > 10_000


def test_cross_dataset_evaluation_maps_classes_by_name(finished, tmp_path):
  """The 8-class run scored on RAF-DB (7 classes, its own order): Contempt
  is left out of the argmax, the report is RAF-DB's 7 x 7, beside the
  record."""
  config, workdir, metrics = finished
  root = write_rafdb(tmp_path / 'raf-basic', train_per_class=3)
  result = evaluation.evaluate(config, str(workdir), 'test', data={
      'layout': 'rafdb', 'root': str(root)})
  assert result['classes'] == list(RAFDB)
  assert result['model_classes'] == list(EXPRESSIONS)
  assert result['left_out_of_argmax'] == ['Contempt']
  assert result['class_mapping'] == {c: EXPRESSIONS.index(c) for c in RAFDB}
  assert np.shape(result['confusion_matrix']) == (7, 7)
  folder = (workdir / 'report' / 'eval' /
            f"test-rafdb-7classes-step{metrics['checkpoint_step']}")
  assert json.loads((folder / 'test_metrics.json').read_text())[
      'class_mapping'] == result['class_mapping']
  # Independently: the model's 8 probabilities, argmax over RAF-DB's
  # classes only, in RAF-DB's positions.
  data_config = inference.trained_config(config, workdir)
  data_config.data.update(layout='rafdb', root=str(root), classes='rafdb')
  records = data.load_splits(data_config)[0]['test']
  state, p_eval, _ = inference.restore(config, workdir, None)
  probs = inference.predict_records(p_eval, state, records, config)['probs']
  columns = [EXPRESSIONS.index(c) for c in RAFDB]
  want = np.mean(probs[:, columns].argmax(1) == records.labels)
  assert result['accuracy'] == pytest.approx(want)


def test_a_step_schedule_that_trained_also_restores(config):
  """The template of a run's state does not depend on the schedule: step
  boundaries at epoch 1 after no warm-up (fine at 12 steps an epoch) are no
  reason to refuse an evaluation."""
  config.train.update(schedule='step', warmup_epochs=0.0,
                      step_decay_epochs=(1, 2))
  _, _, template = inference.state_shape(config)
  model = models.create_model(config.model, axis_name=steps.AXIS)
  tx = steps.create_optimizer(config.train,
                              steps.learning_rate_fn(config.train, 12), 12)
  trained = jax.eval_shape(lambda: steps.create_train_state(
      model, tx, config.data.image_size, config.train.seed))
  assert jax.tree.structure(template) == jax.tree.structure(trained)
  assert jax.tree.map(lambda x: x.shape, template) == jax.tree.map(
      lambda x: x.shape, trained)
