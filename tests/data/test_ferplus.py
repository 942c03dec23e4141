"""FERPlus's four label modes against a port of FERPlus's own rules, the
labels probability mode draws each epoch, and runs of the old rules."""

import csv
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from fer_jax import labels, losses, steps, training
from fer_jax import workdir as workdir_lib
from fer_jax.config_rules import UsageError
from fer_jax.data import fer2013, index, pipeline
from fer_jax.data.index import Records
from tests.conftest import tiny_config
from tests.data.test_affectnet import data_config
from tests.data.test_benchmark_sets import csv_text, faces, pixel_text

MODES = ('majority', 'probability', 'crossentropy', 'multi_target')
EPSILON = 0.001  # FERPlus's multi_target floor


# The reference: FERPlus's rules (src/ferplus.py at ae2128ab), in plain
# Python over its 10 vote columns, step for step as FERPlus runs them. --

def reference_distribution(raw: list[float], mode: str) -> list[float]:
  """FERPlus's _process_data: a row's processed distribution (10 columns);
  rows it gives up on are all 'unknown'."""
  votes = [0.0 if v < 1.0 + sys.float_info.epsilon else float(v)
           for v in raw]
  total = sum(votes)
  unknown = [0.0] * 10
  unknown[8] = 1.0
  picked = [0.0] * 10
  if mode == 'majority':
    top = max(votes)
    if top > 0.5 * total:
      picked[int(np.argmax(votes))] = top
    else:
      picked = unknown
  elif mode in ('probability', 'crossentropy'):
    taken_sum, taken, going = 0.0, 0, True
    while taken_sum < 0.75 * total and taken < 3 and going:
      top = max(votes)
      for i in range(10):
        if votes[i] != top:
          continue
        picked[i], votes[i] = top, 0.0
        taken_sum += top
        taken += 1
        if i >= 8:  # unknown or NF among the tied
          going = False
          if sum(picked) > top:  # expressions came first: leave it out
            picked[i] = 0.0
            taken -= 1
          break
    if sum(picked) <= 0.5 * total or taken > 3:
      picked = unknown
  else:
    for i in range(10):
      if votes[i] >= 0.3 * total:
        picked[i] = votes[i]
    if sum(picked) <= 0.5 * total:
      picked = unknown
  return [p / sum(picked) for p in picked]


def reference_row(raw: list[float], mode: str):
  """FERPlus's load_folders and _process_target for one training row:
  (kept, label (a vote column), target over the 8 expressions, FERPlus's
  column order); probability's target is the distribution it draws from."""
  distribution = reference_distribution(raw, mode)
  label = int(np.argmax(distribution))
  if label >= 8:
    return False, label, None
  target = np.array(distribution[:8]) / sum(distribution[:8])
  if mode == 'multi_target':
    target = (1 - EPSILON) * (target > 0) + EPSILON * np.ones_like(target)
  return True, label, target


def generated_votes(n: int, seed: int = 0) -> np.ndarray:
  """n rows of 10 vote counts: a few favoured columns (unknown and NF
  among them), single votes, ties copied in, 3 to 15 voters."""
  rng = np.random.default_rng(seed)
  rows = np.zeros((n, 10), np.int64)
  for row in rows:
    favoured = rng.choice(10, rng.integers(1, 5), replace=False,
                          p=[.11] * 8 + [.06, .06])
    row[favoured] += rng.multinomial(rng.integers(3, 13),
                                     rng.dirichlet(np.ones(len(favoured))))
    row[rng.choice(10, rng.integers(0, 4), replace=False)] += 1
    for _ in range(rng.choice(3, p=[.5, .3, .2])):  # ties
      row[rng.integers(10)] = row.max() if rng.random() < .6 else (
          np.sort(row)[-2])
    if rng.random() < .05:  # many tied: more than three columns taken
      row[rng.choice(10, rng.integers(4, 6), replace=False)] = (
          rng.integers(2, 4))
    row[0] += not row.any()
  return rows


def coverage(rows: np.ndarray) -> dict:
  """How many rows show each case the rules treat apart."""
  kept = np.where(rows > 1, rows, 0)
  top = kept.max(1, keepdims=True)
  at_top = (kept == top) & (top > 0)
  return {
      'single votes': int((rows == 1).any(1).sum()),
      'none left': int((top == 0).sum()),
      'tied top': int((at_top.sum(1) > 1).sum()),
      'four tied at top': int((at_top[:, :8].sum(1) > 3).sum()),
      'expression tied with unknown or NF': int(
          (at_top[:, :8].any(1) & at_top[:, 8:].any(1)).sum()),
      'unknown or NF alone at top': int(
          (at_top[:, 8:].any(1) & ~at_top[:, :8].any(1)).sum()),
      'unknown or NF below the top': int(
          ((kept[:, 8:] > 0).any(1) & ~at_top[:, 8:].any(1)).sum()),
  }


VOTES = generated_votes(2400)


@pytest.fixture(scope='module')
def vote_folders(tmp_path_factory) -> Path:
  """VOTES as FERPlus's training folder (empty image files, not decoded)."""
  root = tmp_path_factory.mktemp('votes')
  for folder in fer2013.FOLDERS.values():
    (root / folder).mkdir()
    (root / folder / fer2013.LABEL_FILE).write_text('')
  train = root / fer2013.FOLDERS['train']
  with open(train / fer2013.LABEL_FILE, 'w', newline='') as f:
    csv.writer(f).writerows([f'img{i:05d}.png', '(0, 0, 48, 48)', *votes]
                            for i, votes in enumerate(VOTES))
  for i in range(len(VOTES)):
    (train / f'img{i:05d}.png').touch()
  return root


def test_generated_votes_cover_every_case_of_the_rules():
  cases = coverage(VOTES)
  assert min(cases.values()) >= 40, cases


@pytest.mark.parametrize('mode', MODES)
def test_modes_keep_label_and_target_rows_as_ferplus_does(vote_folders,
                                                          mode):
  indexes = fer2013.index_ferplus(vote_folders, data_config(
      vote_folders, ferplus_labels=mode, check_images=False))
  records, report = index.to_records(indexes['train'], 'raise',
                                     labels.PRESETS['ferplus'])
  reference = [reference_row(list(map(float, v)), mode) for v in VOTES]
  kept = [i for i, (keep, _, _) in enumerate(reference) if keep]
  assert [int(Path(p).stem[3:]) for p in records.paths] == kept
  assert sum(report.dropped_classes.values()) == len(VOTES) - len(kept)
  # The ferplus preset is FERPlus's column order: a label is its column.
  assert records.labels.tolist() == [reference[i][1] for i in kept]
  targets = np.array([reference[i][2] for i in kept])
  if mode == 'majority':
    assert records.soft is None
  elif mode == 'multi_target':
    # The loss's targets: 1 on the kept classes, FERPlus's floor elsewhere.
    np.testing.assert_array_equal(records.soft > 0, targets > EPSILON)
  else:
    np.testing.assert_allclose(records.soft, targets, rtol=1e-6)
  print(f'{mode}: {len(kept)} of {len(VOTES)} rows kept, as the reference')


def test_multi_target_runs_score_the_reference_targets(vote_folders):
  indexes = fer2013.index_ferplus(vote_folders, data_config(
      vote_folders, ferplus_labels='multi_target', check_images=False))
  records, _ = index.to_records(indexes['train'], 'raise',
                                labels.PRESETS['ferplus'])
  targets = np.array([reference_row(list(map(float, VOTES[i])),
                                    'multi_target')[2]
                      for i in (int(Path(p).stem[3:]) for p in records.paths)])
  assert (np.count_nonzero(targets == 1, axis=1) > 1).sum() > 100
  logits = np.random.default_rng(1).normal(0, 3, targets.shape)
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  expected = -np.log(np.max(targets * p, axis=1))
  got = losses.multi_target_loss(np.float32(logits), records.soft)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


# Probability: a label drawn each epoch ---------------------------------------

def soft_records(soft: np.ndarray) -> Records:
  n = len(soft)
  return Records(paths=np.array([f'{i}' for i in range(n)]),
                 labels=np.argmax(soft, 1).astype(np.int32),
                 va=np.zeros((n, 2), np.float32), va_mask=np.zeros(n, bool),
                 boxes=np.full((n, 4), np.nan, np.float32),
                 soft=soft.astype(np.float32))


def test_probability_draws_each_epoch_by_seed_and_epoch_alone():
  soft = np.array([[.5, .3, .2, 0], [0, 0, 1, 0], [0, .25, 0, .75]] * 40)
  order = lambda seed: pipeline.RunOrder(soft_records(soft), 'uniform', seed,
                                         500, len(soft), draw_labels=True)
  draws = np.array([order(7).epoch_labels(e) for e in range(500)])
  np.testing.assert_array_equal(draws[3], order(7).epoch_labels(3))
  assert (draws[3] != order(8).epoch_labels(3)).any()
  assert (draws[3] != draws[4]).any()
  # Every draw has probability > 0, and each class comes as often as its
  # probability says (within 5 standard errors of 500 x 40 draws).
  assert (soft[np.arange(len(soft)), draws] > 0).all()
  for row in range(3):
    picked = draws[:, row::3].reshape(-1)
    frequency = np.bincount(picked, minlength=4) / len(picked)
    error = np.sqrt(soft[row] * (1 - soft[row]) / len(picked))
    assert (np.abs(frequency - soft[row]) <= 5 * error + 1e-12).all(), row
  # The order is the one the same seed gives without drawing.
  plain = pipeline.RunOrder(soft_records(soft), 'uniform', 7, 500, len(soft))
  np.testing.assert_array_equal(plain.epoch_order(3),
                                order(7).epoch_order(3))


def write_ferplus(root: Path, rows: list[tuple[str, str]]) -> Path:
  """fer2013.csv and fer2013new.csv of rows (Usage, 10 votes)."""
  root.mkdir(parents=True, exist_ok=True)
  face = faces(len(rows), seed=3)
  (root / 'fer2013.csv').write_text(csv_text(
      ['emotion', 'pixels', 'Usage'],
      [['0', pixel_text(f), usage] for f, (usage, _) in zip(face, rows)]))
  (root / 'fer2013new.csv').write_text(csv_text(
      list(fer2013.FERPLUS_COLUMNS),
      [[usage, f'fer{i:07d}.png', *votes.split(',')]
       for i, (usage, votes) in enumerate(rows)]))
  return root


# Training rows whose kept votes spread over two or three expressions, and
# majority-labelled validation and test rows.
SPREAD = ['5,3,2,0,0,0,0,0,0,0', '0,4,0,0,0,3,3,0,0,0',
          '0,0,6,0,4,0,0,0,0,0', '2,0,0,5,0,0,0,3,0,0',
          '3,3,0,0,0,0,0,0,2,2', '0,0,0,0,4,0,4,2,0,0']
CLEAR = ['8,2,0,0,0,0,0,0,0,0', '0,9,0,0,0,0,0,0,1,0',
         '0,0,7,3,0,0,0,0,0,0', '0,0,0,6,2,2,0,0,0,0']


def ferplus_config(root: Path, cache: Path, mode: str):
  config = tiny_config(cache)
  config.data.update(layout='ferplus', root=str(root), ferplus_labels=mode,
                     index_cache_dir=str(cache / 'index'),
                     index_processes=1)
  config.train.update(num_epochs=3, batch_size=8, eval_batch_size=8)
  return config


@pytest.fixture(scope='module')
def ferplus_root(tmp_path_factory) -> Path:
  rows = ([('Training', v) for v in SPREAD * 4] +
          [(u, v) for u in ('PublicTest', 'PrivateTest') for v in CLEAR])
  return write_ferplus(tmp_path_factory.mktemp('ferplus'), rows)


def run_targets(batches, count: int) -> list[np.ndarray]:
  return [next(batches)['soft'].reshape(-1, 8) for _ in range(count)]


def test_probability_batches_draw_one_hot_labels_again_each_epoch_and_on_resume(
    ferplus_root, tmp_path):
  from fer_jax import data
  config = ferplus_config(ferplus_root, tmp_path, 'probability')
  config.data.image_size = 16
  splits, _ = data.load_splits(config)
  train = splits['train']
  assert splits['val'].soft is None and splits['test'].soft is None
  steps_per_epoch = len(train) // 8
  total = 3 * steps_per_epoch
  whole = run_targets(pipeline.train_batches(train, config, 2), total)
  for targets in whole:  # one-hot, on a class with kept votes
    assert (targets.sum(1) == 1).all() and (targets.max(1) == 1).all()
  positive = train.soft > 0
  drawn = {}
  order = pipeline.RunOrder(train, config.data.sampler, config.train.seed,
                            3, steps_per_epoch * 8, draw_labels=True)
  for epoch in range(3):
    labels_now = order.epoch_labels(epoch)
    assert positive[np.arange(len(train)), labels_now].all()
    drawn[epoch] = labels_now
    for k in range(steps_per_epoch):
      positions = order.epoch_order(epoch)[k * 8:(k + 1) * 8]
      np.testing.assert_array_equal(
          whole[epoch * steps_per_epoch + k].argmax(1), labels_now[positions])
  assert (drawn[0] != drawn[1]).any() and (drawn[1] != drawn[2]).any()
  # A run resumed at any step draws the labels the whole run drew.
  for start in (1, steps_per_epoch, steps_per_epoch + 1):
    resumed = run_targets(pipeline.train_batches(
        train, config, 2, start_step=start), total - start)
    for got, want in zip(resumed, whole[start:]):
      np.testing.assert_array_equal(got, want)


# Runs under the old rules ----------------------------------------------------

def test_resume_of_a_run_under_the_old_probability_rules_is_refused(
    ferplus_root, tmp_path):
  """A soft-label run started before FERPlus's rules were followed (its
  data_report.json records no ferplus_rules) is refused by name on resume;
  one of this fer_jax resumes."""
  config = ferplus_config(ferplus_root, tmp_path, 'probability')
  config.train.num_epochs = 1
  workdir = tmp_path / 'run'
  training.train_and_evaluate(config, str(workdir))
  shutil.rmtree(workdir / 'report')  # killed before its test report
  assert workdir_lib.decide(workdir, config)[0] == workdir_lib.RESUME
  report = json.loads((workdir / 'data_report.json').read_text())
  assert report.pop('ferplus_rules') == fer2013.FERPLUS_RULES
  (workdir / 'data_report.json').write_text(json.dumps(report))
  with pytest.raises(UsageError, match=re.escape(
      f"{workdir}: its FERPlus labels (data.ferplus_labels='probability') "
      f'were made under FERPlus rules 1 and this fer_jax makes them under '
      f'rules {fer2013.FERPLUS_RULES}')):
    training.train_and_evaluate(config, str(workdir))
  config.data.ferplus_labels = 'majority'  # majority's rule is unchanged
  config_json = json.loads((workdir / 'config.json').read_text())
  config_json['data']['ferplus_labels'] = 'majority'
  (workdir / 'config.json').write_text(json.dumps(config_json))
  assert workdir_lib.decide(workdir, config)[0] == workdir_lib.RESUME


def test_multi_target_runs_train_on_ferplus_loss(ferplus_root, tmp_path):
  from fer_jax import data, models
  config = ferplus_config(ferplus_root, tmp_path, 'multi_target')
  splits, _ = data.load_splits(config)
  model = models.create_model(config.model, axis_name=steps.AXIS,
                              num_classes=8)
  tx = steps.create_optimizer(config.train, lambda _: 0.0)
  state = steps.create_train_state(model, tx, 32, 0)
  batch = next(pipeline.train_batches(splits['train'], config, 2))
  p_train, _ = steps.pmap_steps(model, tx, config)
  _, metrics = p_train(steps.replicate(state), steps.shard(batch))
  images = steps.normalise_images(batch['image'].reshape(-1, 32, 32, 3),
                                  config.data.mean_rgb, config.data.std_rgb)
  # One device's model over the whole batch: BatchNorm's statistics are
  # those the two devices share.
  logits = np.float64(models.create_model(config.model, num_classes=8).apply(
      {'params': state.params, 'batch_stats': state.batch_stats}, images,
      train=True, mutable=['batch_stats'])[0]['logits'])
  soft = batch['soft'].reshape(-1, 8)
  assert (np.count_nonzero(soft, 1) > 1).any()
  t = np.where(soft > 0, 1.0, EPSILON)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  expected = np.mean(-np.log(np.max(t * p, axis=1)))
  assert float(steps.unreplicate(metrics)['ce_loss']) == pytest.approx(
      expected, rel=1e-4)


def test_multi_target_refuses_label_smoothing(ferplus_root, tmp_path):
  from fer_jax import config_rules
  config = ferplus_config(ferplus_root, tmp_path, 'multi_target')
  config.train.label_smoothing = 0.1
  with pytest.raises(UsageError, match=(
      "train.label_smoothing: 0.1 does not apply to "
      "data.ferplus_labels='multi_target'")):
    config_rules.check(config, 2)
