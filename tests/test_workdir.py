"""The decisions about a workdir, taken before anything in it changes."""

import numpy as np
import pytest

from fer_jax import config_rules, data, files, workdir
from fer_jax.config_rules import UsageError


def started(folder, config, **sections):
  """A workdir whose config.json is config with sections' fields set."""
  saved = config_rules.as_json(config)
  for section, fields in sections.items():
    saved[section].update(fields)
  files.write_json(folder / 'config.json', saved)
  return folder


def test_fresh_resume_finished(config, tmp_path):
  assert workdir.decide(tmp_path / 'new', config) == (workdir.FRESH, {})
  run = started(tmp_path, config, data={'num_workers': 2})
  assert workdir.decide(run, config) == (
      workdir.RESUME, {'data.num_workers': (2, 0)})
  files.write_json(workdir.test_report(run), {'epochs_trained': 2})
  assert workdir.decide(run, config)[0] == workdir.FINISHED


@pytest.mark.parametrize('left', ['checkpoints/5', 'metrics.jsonl',
                                  'report/test_metrics.json'])
def test_results_without_a_config_are_refused(config, tmp_path, left):
  """A stale test report would otherwise pass for a later run's."""
  (tmp_path / left).parent.mkdir(parents=True, exist_ok=True)
  if left.endswith('5'):
    (tmp_path / left).mkdir()
  else:
    (tmp_path / left).write_text('{}')
  with pytest.raises(UsageError, match='but no config.json'):
    workdir.decide(tmp_path, config)


@pytest.mark.parametrize('schedule,refused', [('cosine', True),
                                              ('constant', False)])
def test_more_epochs_change_a_cosine_run_only(config, tmp_path, schedule,
                                              refused):
  config.train.schedule = schedule
  run = started(tmp_path, config, train={'num_epochs': 5})
  if refused:
    with pytest.raises(UsageError, match='train.num_epochs 5 -> 2'):
      workdir.decide(run, config)
  else:
    assert workdir.decide(run, config)[1] == {'train.num_epochs': (5, 2)}


def test_an_older_report_without_stopped_early(config, tmp_path):
  """Fewer epochs than it started with: it stopped early, nothing to do."""
  run = started(tmp_path, config, train={'num_epochs': 10})
  files.write_json(workdir.test_report(run), {'epochs_trained': 4})
  config.train.num_epochs = 10
  assert workdir.decide(run, config)[0] == workdir.FINISHED


def test_split_differences_name_images_order_and_labels(config, tmp_path):
  splits, report = data.load_splits(config)
  workdir.write_record(tmp_path, config, splits, report, 'summary')
  root = report['root']
  assert workdir.split_differences(tmp_path, splits, root) == {}
  train = splits['train']
  changed = {'train': train.subset(np.arange(1, len(train)))}
  assert workdir.split_differences(tmp_path, changed, root) == {
      'train': '1 images no longer in it, 0 new'}
  reordered = {'train': train.subset(np.arange(len(train))[::-1])}
  assert workdir.split_differences(tmp_path, reordered, root) == {
      'train': 'the same images in another order'}
  relabelled = train.subset(np.arange(len(train)))
  relabelled.labels[0] = (relabelled.labels[0] + 1) % 8
  assert workdir.split_differences(tmp_path, {'train': relabelled}, root) == {
      'train': 'the same images with other labels'}


def test_outputs_beside_the_record_never_share_a_folder(tmp_path):
  first = workdir.output_dir(tmp_path, 'eval', 'test-step9')
  second = workdir.output_dir(tmp_path, 'eval', 'test-step9')
  assert (first.name, second.name) == ('test-step9', 'test-step9.2')
  assert first.parent == tmp_path / 'report' / 'eval'
