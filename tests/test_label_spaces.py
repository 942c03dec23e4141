"""A run in another label space (RAF-DB's 7 classes) end to end, and
cross-dataset evaluation between label spaces."""

import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import scipy.special
from PIL import Image
from sklearn import metrics as skm

from fer_jax import (data, evaluation, export, face_contract, inference,
                     labels, losses, predict, training)
from fer_jax.config_rules import UsageError
from fer_jax.data import pipeline
from tests.conftest import ROOT, command_line, tiny_config

RAFDB = labels.PRESETS['rafdb']


def face(label: int, seed: int) -> bytes:
  """A 40 px JPEG whose colour says its RAF-DB label (1-7)."""
  rng = np.random.default_rng(seed)
  colour = np.array([(label * 37) % 256, (label * 91) % 256, label * 30])
  pixels = np.clip(colour + rng.normal(0, 12, (40, 40, 3)), 0, 255)
  buffer = io.BytesIO()
  Image.fromarray(pixels.astype(np.uint8)).save(buffer, 'JPEG', quality=95)
  return buffer.getvalue()


def write_rafdb(root: Path, train_per_class: int = 6,
                test_per_class: int = 2) -> Path:
  """A RAF-DB basic folder in the official layout: the label list and the
  aligned faces."""
  lines, seed = [], 0
  for split, per_class in (('train', train_per_class),
                           ('test', test_per_class)):
    for label in range(1, 8):
      for _ in range(per_class):
        seed += 1
        stem = f'{split}_{seed:05d}'
        lines.append(f'{stem}.jpg {label}')
        image = root / 'Image' / 'aligned' / f'{stem}_aligned.jpg'
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(face(label, seed))
  (root / 'EmoLabel').mkdir(parents=True, exist_ok=True)
  (root / 'EmoLabel' / 'list_patition_label.txt').write_text(
      '\n'.join(lines) + '\n')
  return root


@pytest.fixture(scope='module')
def rafdb_root(tmp_path_factory) -> Path:
  return write_rafdb(tmp_path_factory.mktemp('raf-basic'))


@pytest.fixture(scope='module')
def rafdb_run(tmp_path_factory, rafdb_root):
  """A finished two-epoch run on RAF-DB's layout: (config, workdir,
  metrics)."""
  config = tiny_config(tmp_path_factory.mktemp('cache'))
  config.data.layout, config.data.root = 'rafdb', str(rafdb_root)
  workdir = tmp_path_factory.mktemp('rafdb_run')
  return config, workdir, training.train_and_evaluate(config, str(workdir))


def expanded(cm) -> tuple[np.ndarray, np.ndarray]:
  """(y_true, y_pred) pairs that a confusion matrix counts."""
  cm = np.asarray(cm)
  true, pred = np.nonzero(cm)
  counts = cm[true, pred]
  return np.repeat(true, counts), np.repeat(pred, counts)


def test_a_rafdb_run_has_seven_classes_everywhere(rafdb_run):
  config, workdir, metrics = rafdb_run
  k = len(RAFDB)
  assert json.loads((workdir / 'config.json').read_text())['data'][
      'classes'] == ','.join(RAFDB)
  report = json.loads((workdir / 'data_report.json').read_text())
  assert report['classes'] == list(RAFDB)
  assert report['test']['class_counts'] == [2] * k
  assert report['train']['class_counts'] == [5] * k  # 6 - 20% held out
  assert report['val']['class_counts'] == [1] * k
  # The head, the report and its figures.
  state, _, _ = inference.restore_state(config, workdir, None)
  assert state.params['head']['expression']['kernel'].shape[-1] == k
  assert metrics['classes'] == list(RAFDB)
  assert list(metrics['per_class']) == list(RAFDB)
  assert np.shape(metrics['confusion_matrix']) == (k, k)
  y_true, y_pred = expanded(metrics['confusion_matrix'])
  assert metrics['macro_f1'] == pytest.approx(skm.f1_score(
      y_true, y_pred, labels=list(range(k)), average='macro',
      zero_division=0))
  # No valence/arousal in RAF-DB: not available, never 0.
  assert metrics['num_va_examples'] == 0
  assert metrics['valence_ccc'] is None and metrics['arousal_rmse'] is None
  page = (workdir / 'report' / 'summary.md').read_text()
  assert '| valence | n/a | n/a | n/a | n/a | n/a |' in page
  assert not (workdir / 'report' / 'va_scatter.png').exists()
  assert export.model_info(config, workdir, 1, {}, {}, None)['classes'] == \
      list(RAFDB)


def test_predict_writes_one_probability_column_per_class(rafdb_run,
                                                         rafdb_root):
  config, workdir, _ = rafdb_run
  crops = rafdb_root / 'Image' / 'aligned'
  config = config.copy_and_resolve_references()
  config.predict.detector = 'none'
  output = predict.predict(config, str(workdir), str(crops))
  rows = list(__import__('csv').DictReader(open(output)))
  assert list(rows[0]) == predict.header(RAFDB)
  probs = np.array([[float(r[f'prob_{c}']) for c in RAFDB] for r in rows])
  np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
  assert {r['expression'] for r in rows} <= set(RAFDB)


def test_a_class_the_model_lacks_is_refused_then_left_out(rafdb_run,
                                                          data_cache):
  """The 7-class model on the synthetic AffectNet (8 classes): refused in
  one line; with data.classes=affectnet7 it is scored on those 7."""
  _, workdir, _ = rafdb_run
  synthetic = {'layout': 'synthetic', 'synthetic.cache_dir': str(data_cache)}
  with pytest.raises(UsageError, match="the model has no class 'Contempt' "
                     'of this data set'):
    evaluation.evaluate(None, str(workdir), 'test', data=synthetic)
  result = evaluation.evaluate(None, str(workdir), 'test', data=dict(
      synthetic, classes='affectnet7'))
  assert result['classes'] == list(labels.EXPRESSIONS[:7])
  assert result['left_out_of_argmax'] == []
  assert result['class_mapping'] == {c: RAFDB.index(c)
                                     for c in labels.EXPRESSIONS[:7]}
  report = json.loads(next((workdir / 'report' / 'eval').glob(
      'test-synthetic-7classes-step*/data_report.json')).read_text())
  assert report['test']['dropped_classes'] == {'Contempt': 4}


# Class folders: their own label space -----------------------------------

SEVEN = labels.EXPRESSIONS[:7]  # every class folder but Contempt's


def write_folders(root: Path, classes: tuple[str, ...] = SEVEN,
                  train_per_class: int = 4, test_per_class: int = 3
                  ) -> Path:
  """A class-folders set, ROOT/{train,test}/<class>/*.jpg, each face's
  colour saying its class."""
  seed = 0
  for split, per_class in (('train', train_per_class),
                           ('test', test_per_class)):
    for name in classes:
      folder = root / split / name.lower()
      folder.mkdir(parents=True, exist_ok=True)
      for _ in range(per_class):
        seed += 1
        (folder / f'{seed:04d}.jpg').write_bytes(
            face(labels.EXPRESSIONS.index(name) + 1, seed))
  return root


@pytest.fixture(scope='module')
def seven_folders(tmp_path_factory) -> Path:
  return write_folders(tmp_path_factory.mktemp('sets') / 'seven')


@pytest.fixture(scope='module')
def folders_run(tmp_path_factory, seven_folders):
  """A finished one-epoch run on 7 class folders, data.classes left ''."""
  config = tiny_config(tmp_path_factory.mktemp('cache'))
  config.data.layout, config.data.root = 'folders', str(seven_folders)
  config.train.num_epochs = 1
  workdir = tmp_path_factory.mktemp('folders_run')
  return config, workdir, training.train_and_evaluate(config, str(workdir))


def test_a_folders_run_has_the_classes_of_its_folders(folders_run):
  """Seven class folders: a 7-way head and a 7-class record, not
  AffectNet's 8 with an empty Contempt."""
  config, workdir, metrics = folders_run
  assert json.loads((workdir / 'config.json').read_text())['data'][
      'classes'] == ','.join(SEVEN)
  assert json.loads((workdir / 'data_report.json').read_text())[
      'classes'] == list(SEVEN)
  state, _, _ = inference.restore_state(config, workdir, None)
  assert state.params['head']['expression']['kernel'].shape[-1] == 7
  assert metrics['classes'] == list(SEVEN)


def test_main_evaluates_a_folders_run_on_its_own_data_alone(folders_run,
                                                            tmp_path):
  """`--mode=evaluate --workdir=RUN` and nothing else: the run's own test
  split (21 images) in its own 7 classes, not the default config's
  generated set."""
  _, workdir, metrics = folders_run
  run = subprocess.run([sys.executable, str(ROOT / 'main.py'),
                        '--mode=evaluate', f'--workdir={workdir}'],
                       cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  step = metrics['checkpoint_step']
  saved = json.loads((workdir / 'report' / 'eval' / f'test-step{step}' /
                      'test_metrics.json').read_text())
  assert saved['num_examples'] == 21 == metrics['num_examples']
  assert saved['classes'] == list(SEVEN)
  assert np.shape(saved['confusion_matrix']) == (7, 7)
  assert saved['confusion_matrix'] == metrics['confusion_matrix']
  assert saved['data_set'] == 'folders-seven'
  assert saved['data_differs_from_training'] == {}
  assert not (tmp_path / 'data').exists()  # no set generated
  assert ('Data: folders-seven at ' in run.stdout and '7 classes (Neutral, '
          'Happy, Sad, Surprise, Fear, Disgust, Anger)' in run.stdout)


def test_an_8_class_model_on_7_class_folders_never_predicts_contempt(
    finished, seven_folders):
  """The AffectNet-8 run scored on the 7 class folders: a 7 x 7 report
  in a folder that names the set; Contempt is out of the argmax."""
  config, workdir, metrics = finished
  result = evaluation.evaluate(config, str(workdir), 'test', data={
      'layout': 'folders', 'root': str(seven_folders)})
  assert result['classes'] == list(SEVEN)
  assert result['left_out_of_argmax'] == ['Contempt']
  assert np.shape(result['confusion_matrix']) == (7, 7)
  assert result['num_examples'] == 21
  assert result['data_set'] == 'folders-seven'
  assert result['data_differs_from_training'] == {
      'data.classes': [','.join(labels.EXPRESSIONS), ','.join(SEVEN)],
      'data.layout': ['synthetic', 'folders'],
      'data.root': ['', str(seven_folders)]}
  folder = (workdir / 'report' / 'eval' /
            f"test-folders-seven-7classes-step{metrics['checkpoint_step']}")
  assert json.loads((folder / 'test_metrics.json').read_text())[
      'classes'] == list(SEVEN)
  # Independently: the model's 8 probabilities, argmax over the 7.
  data_config = inference.trained_config(config, workdir)
  data_config.data.update(layout='folders', root=str(seven_folders),
                          classes='affectnet7')
  records = data.load_splits(data_config)[0]['test']
  state, p_eval, _ = inference.restore(config, workdir, None)
  probs = inference.predict_records(p_eval, state, records, config)['probs']
  want = np.mean(probs[:, :7].argmax(1) == records.labels)
  assert result['accuracy'] == pytest.approx(want)


def test_a_grey_model_sees_another_sets_faces_grey(finished, seven_folders):
  """A model whose face contract is grey, scored on colour folders: their
  faces are turned grey, as the report says, and the numbers are those of
  the grey faces."""
  config, workdir, _ = finished
  path = workdir / face_contract.FILE
  path.write_text(json.dumps({**json.loads(path.read_text()),
                              'colour': 'grey'}))
  result = evaluation.evaluate(config, str(workdir), 'test', data={
      'layout': 'folders', 'root': str(seven_folders)})
  assert result['faces_turned_grey'] is True
  data_config = inference.trained_config(config, workdir)
  data_config.data.update(layout='folders', root=str(seven_folders),
                          classes='affectnet7')
  records = data.load_splits(data_config)[0]['test']
  grey = np.stack([face_contract.to_grey(pipeline.load_image(
      records[i], data_config.data)) for i in range(len(records))])
  assert not face_contract.is_grey(pipeline.load_image(records[0],
                                                       data_config.data))
  state, p_eval, _ = inference.restore(config, workdir, None)
  probs = inference.predict_records(p_eval, state, dataclasses.replace(
      records, images=grey), config)['probs']
  want = np.mean(probs[:, :7].argmax(1) == records.labels)
  assert result['accuracy'] == pytest.approx(want)


def test_class_folders_are_matched_to_the_model_by_name(folders_run,
                                                        tmp_path):
  """The 7-folder run on other class folders (the same layout): on 6 of
  its classes, scored over those 6; with Contempt, refused in one line."""
  _, workdir, _ = folders_run
  six = SEVEN[:4] + SEVEN[5:]  # no Fear
  root = write_folders(tmp_path / 'six', six, 5, 2)
  result = evaluation.evaluate(None, str(workdir), 'test',
                               data={'root': str(root)})
  assert result['classes'] == list(six)
  assert result['left_out_of_argmax'] == ['Fear']
  assert np.shape(result['confusion_matrix']) == (6, 6)
  assert result['num_examples'] == 12
  root = write_folders(tmp_path / 'eight', labels.EXPRESSIONS, 5, 1)
  with pytest.raises(UsageError, match=(
      f"{workdir}: the model has no class 'Contempt' of this data set")):
    evaluation.evaluate(None, str(workdir), 'test', data={'root': str(root)})


def test_shared_classes_are_scored_from_their_logits_never_nan(
    config, seven_folders):
  """Contempt's logit 200 above the rest: every other class's float32
  probability underflows to 0. Their softmax over their own logits still
  finds each true class, as a float64 softmax does."""
  records = data.load_splits(dict_config(config, layout='folders',
                                         root=str(seven_folders),
                                         classes='affectnet7'))[0]['test']

  def p_eval(state, batch):
    true = np.asarray(batch['label'])  # [devices, per device]
    logits = np.where(np.arange(8) == true[..., None], 1.0, 0.0)
    logits[..., 7] = 200.0
    logits = logits.astype(np.float32)
    outputs = {'logits': logits.reshape(-1, 8), 'va': np.zeros(
        (true.size, 2), np.float32)}
    flat = {k: np.asarray(batch[k]).reshape(-1, *np.shape(batch[k])[2:])
            for k in ('label', 'va', 'va_mask', 'mask')}
    sums = losses.loss_sums(outputs, flat)
    return {'probs': np.asarray(jax.nn.softmax(logits)), 'logits': logits,
            'va': np.zeros(true.shape + (2,), np.float32),
            'sums': {k: np.broadcast_to(np.asarray(v), (true.shape[0],
                                                        *np.shape(v)))
                     for k, v in sums.items()}}

  result, out = inference.evaluate_records(p_eval, None, records, config,
                                           SEVEN)
  assert not np.isnan(out['probs']).any()
  assert result['accuracy'] == 1.0
  want = scipy.special.softmax(out['logits'][:, :7].astype(np.float64), 1)
  np.testing.assert_allclose(out['probs'], want, rtol=1e-6)
  assert (out['probs'].argmax(1) == records.labels).all()


def dict_config(config, **data):
  """config with the given data fields."""
  config = config.copy_and_resolve_references()
  config.data.update(data)
  return config


def test_bad_rows_are_counted_by_reason_or_refused_in_one_line(tmp_path):
  root = write_rafdb(tmp_path / 'raf-basic', train_per_class=3)
  list_file = root / 'EmoLabel' / 'list_patition_label.txt'
  with open(list_file, 'a') as f:
    f.write('train_09998.jpg 5\ntrain_09999.jpg 2\ntest_09997.jpg 9\n'
            'train_00001.jpg 3\n')
  config = tiny_config(tmp_path / 'cache')
  config.data.update(layout='rafdb', root=str(root), on_error='skip')
  _, report = data.load_splits(config)
  assert report['train']['skipped_by_reason'] == {
      'image file missing': 2, '... listed again (line N)': 1}
  assert report['test']['skipped_by_reason'] == {'label ... not in N..N': 1}
  config.data.on_error = 'raise'
  run = subprocess.run(command_line(config, tmp_path / 'run'),
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 1
  assert run.stderr.strip().splitlines()[-1] == (
      f'fer_jax: {list_file}:36: {root}/Image/aligned/train_09998_aligned.jpg'
      ': image file missing (data.on_error=skip drops such files and lists '
      'them in data_report.json)')
  assert 'Traceback' not in run.stderr
  assert not (tmp_path / 'run').exists()


def write_fer(root: Path, ferplus: bool) -> Path:
  """fer2013.csv (and FERPlus's fer2013new.csv beside it): per class 3
  Training, 1 PublicTest and 1 PrivateTest row, each face a grey level
  that says its class."""
  from tests.data.test_benchmark_sets import csv_text, pixel_text
  from fer_jax.data import fer2013
  k = 8 if ferplus else 7
  usages = ['Training'] * 3 + ['PublicTest', 'PrivateTest']
  rows = [(c, u) for c in range(k) for u in usages]
  face = lambda c: np.full((48, 48), 20 + 28 * c, np.uint8)
  root.mkdir(parents=True)
  (root / 'fer2013.csv').write_text(csv_text(
      ['emotion', 'pixels', 'Usage'],
      [[str(c % 7), pixel_text(face(c)), u] for c, u in rows]))
  if ferplus:  # votes: 7 for the class, 2 for the next, 1 unknown
    votes = lambda c: [7 if i == c else 2 if i == (c + 1) % 8 else 0
                       for i in range(8)] + [1, 0]
    (root / 'fer2013new.csv').write_text(csv_text(
        list(fer2013.FERPLUS_COLUMNS),
        [[u, f'fer{i:07d}.png', *map(str, votes(c))]
         for i, (c, u) in enumerate(rows)]))
  return root


@pytest.mark.parametrize('layout', ['fer2013', 'ferplus'])
def test_fer2013_and_ferplus_runs_have_their_classes_everywhere(
    layout, tmp_path):
  """FER2013 (7 classes, pixels from the CSV) and FERPlus (8, trained on
  the vote distributions): the head, the counts and the report in the
  layout's own label space."""
  config = tiny_config(tmp_path / 'cache')
  config.data.update(layout=layout, root=str(write_fer(
      tmp_path / layout, layout == 'ferplus')), ferplus_labels='probability')
  config.train.num_epochs = 1
  workdir = tmp_path / 'run'
  metrics = training.train_and_evaluate(config, str(workdir))
  classes = labels.PRESETS[layout]
  report = json.loads((workdir / 'data_report.json').read_text())
  assert report['classes'] == list(classes)
  assert [report[s]['class_counts'] for s in ('train', 'val', 'test')] == [
      [3] * len(classes), [1] * len(classes), [1] * len(classes)]
  state, _, _ = inference.restore_state(config, workdir, None)
  assert state.params['head']['expression']['kernel'].shape[-1] == len(
      classes)
  assert list(metrics['per_class']) == list(classes)
  y_true, y_pred = expanded(metrics['confusion_matrix'])
  assert metrics['macro_f1'] == pytest.approx(skm.f1_score(
      y_true, y_pred, labels=list(range(len(classes))), average='macro',
      zero_division=0))
  assert metrics['valence_ccc'] is None
