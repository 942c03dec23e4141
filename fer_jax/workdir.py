"""A run's workdir: what it holds, and the decisions taken before it changes.

The record of a run (config.json, splits.npz, data_report.json,
metrics.jsonl, checkpoints/ and the test report under report/) is written
by training, and only once: decide() reads the workdir and either refuses
(leaving every file as it was) or says what training will do. Evaluation
and prediction write beside the record, in folders of their own
(output_dir).
"""

import datetime
import json
from pathlib import Path

import ml_collections
import numpy as np
from absl import logging

from fer_jax import config_rules, face_contract, files
from fer_jax.config_rules import UsageError
from fer_jax.data import fer2013, pipeline, relative_paths
from fer_jax.data.index import Records

FRESH, RESUME, FINISHED = 'fresh', 'resume', 'finished'
CHANGE_LOG = 'config_changes.jsonl'
IMPORT_RECORD = 'import.json'  # a model imported, not trained (import_model)


def test_report(workdir: Path) -> Path:
  """The run's test metrics; written last, so it marks a finished run."""
  return Path(workdir) / 'report' / 'test_metrics.json'


def read_json(path: Path) -> dict:
  """A JSON file of the record; UsageError naming it if unreadable."""
  try:
    return json.loads(Path(path).read_text())
  except (OSError, ValueError) as error:
    raise UsageError(f'{path}: unreadable ({error})') from None


def decide(workdir: Path, config: ml_collections.ConfigDict
           ) -> tuple[str, dict]:
  """FRESH, RESUME or FINISHED, and the allowed config changes.

  Refuses (UsageError) a config that changes what the checkpoints mean
  (train.num_epochs too, under the cosine schedule, while training), a
  finished run asked to train longer, results without a config.json, and
  an imported model.
  Writes nothing.
  """
  workdir = Path(workdir)
  if (workdir / IMPORT_RECORD).exists():
    raise UsageError(f'{workdir}: holds an imported model ({IMPORT_RECORD}), '
                     'not a training run; train in a new --workdir')
  if not (workdir / 'config.json').exists():
    left = [name for name, found in (
        ('checkpoints', any((workdir / 'checkpoints').glob('[0-9]*'))),
        ('metrics.jsonl', (workdir / 'metrics.jsonl').exists()),
        ('a test report', test_report(workdir).exists())) if found]
    if left:
      raise UsageError(f'{workdir}: has {", ".join(left)} but no '
                       'config.json, so nothing says what they are; use '
                       'another --workdir')
    return FRESH, {}
  saved = read_json(workdir / 'config.json')
  allowed = config_rules.HOW_FIELDS
  if (saved['train'].get('schedule') == 'cosine' and
      not test_report(workdir).exists()):
    # The cosine decays over all epochs: more or fewer would change the
    # rate of every step still to come.
    allowed = tuple(f for f in allowed if f != 'train.num_epochs')
  refused = config_rules.meaning_changes(saved, config, allowed)
  if refused:
    raise UsageError(
        f'{workdir}: this run was started with another config, and its '
        'checkpoints mean what that one says: '
        f'{config_rules.describe(refused)}. Use a new --workdir for the new '
        'config.')
  changed = config_rules.changes(saved, config)
  if not test_report(workdir).exists():
    _check_ferplus_rules(workdir, saved)
    return RESUME, changed
  report = read_json(test_report(workdir))
  trained = report.get('epochs_trained')
  # Reports of older versions lack 'stopped_early'; their runs stopped
  # early if they trained fewer epochs than they started with.
  stopped_early = report.get('stopped_early', trained is not None and
                             trained < saved['train']['num_epochs'])
  if (trained is not None and config.train.num_epochs > trained and
      not stopped_early):
    raise UsageError(
        f'{workdir}: this run finished after {trained} epochs and wrote its '
        f'test report; train.num_epochs={config.train.num_epochs} would '
        'change that record. Train longer in a new --workdir.')
  return FINISHED, changed


def log_changes(workdir: Path, changed: dict) -> None:
  """Appends the allowed config changes of this session, with the time."""
  if changed:
    files.append_jsonl(Path(workdir) / CHANGE_LOG, {
        'time': datetime.datetime.now().astimezone().isoformat(
            timespec='seconds'),
        'changes': {k: list(v) for k, v in changed.items()}})


def _split_arrays(splits: dict[str, Records], root: str) -> dict:
  arrays = {'root': np.array(str(root))}
  for name, records in splits.items():
    arrays[name] = np.array(relative_paths(records.paths, root))
    arrays[f'{name}_labels'] = records.labels
    arrays[f'{name}_va'] = records.va
  return arrays


def _check_ferplus_rules(workdir: Path, saved: dict) -> None:
  """Refuses to go on with a FERPlus run whose soft labels were made under
  other rules than this fer_jax's (its data_report.json records them; runs
  from before the rules were numbered record none). Majority labels have
  not changed."""
  data = saved['data']
  if data.get('layout') != 'ferplus' or data.get(
      'ferplus_labels', 'majority') == 'majority':
    return
  path = workdir / 'data_report.json'
  rules = read_json(path).get('ferplus_rules', 1) if path.exists() else 1
  if rules != fer2013.FERPLUS_RULES:
    raise UsageError(
        f"{workdir}: its FERPlus labels (data.ferplus_labels="
        f"{data['ferplus_labels']!r}) were made under FERPlus rules {rules} "
        f'and this fer_jax makes them under rules {fer2013.FERPLUS_RULES} '
        '(other rows kept, other targets: docs/datasets.md); one run under '
        'two rules would mean neither. Use a new --workdir.')


def write_record(workdir: Path, config: ml_collections.ConfigDict,
                 splits: dict[str, Records], data_report: dict,
                 model_summary: str) -> None:
  """A fresh run's record: model_summary.txt, face_contract.json (how
  its training faces were made, calibrated on a sample of them),
  data_report.json, splits.npz, then config.json (last: its presence
  makes the workdir a run)."""
  workdir = Path(workdir)
  if config.data.layout == 'ferplus':  # how its labels were made
    data_report = {**data_report, 'ferplus_rules': fer2013.FERPLUS_RULES}
  train = splits['train']
  contract = face_contract.build(
      config, train, lambda i: pipeline.base_image(train[i], config.data))
  logging.info('Face contract: %s, %s; %s', contract['geometry'],
               contract['colour'], contract['calibration']['note'])
  data_report = {**data_report, 'face_contract': {
      k: contract[k] for k in ('geometry', 'colour', 'colour_source',
                               'calibration')}}
  files.write_text(workdir / 'model_summary.txt', model_summary + '\n')
  face_contract.write(workdir, contract)
  files.write_json(workdir / 'data_report.json', data_report)
  files.write_npz(workdir / 'splits.npz',
                  **_split_arrays(splits, data_report['root']))
  files.write_json(workdir / 'config.json', config_rules.as_json(config))


def split_differences(workdir: Path, splits: dict[str, Records],
                      root: str) -> dict[str, str]:
  """{split: what differs} between splits and the run's splits.npz: paths
  (relative to the data root, so a moved data set differs in nothing),
  labels or valence/arousal. {} without a splits.npz."""
  path = Path(workdir) / 'splits.npz'
  if not path.exists():
    return {}
  now = _split_arrays(splits, root)
  differences = {}
  with np.load(path) as saved:
    if 'root' not in saved:  # written before paths were relative
      now.update({name: records.paths for name, records in splits.items()})
    for name in splits:
      if name not in saved:
        continue
      then, current = set(saved[name].tolist()), set(now[name].tolist())
      if then != current:
        differences[name] = (f'{len(then - current)} images no longer in it, '
                             f'{len(current - then)} new')
      elif not np.array_equal(saved[name], now[name]):
        differences[name] = 'the same images in another order'
      elif not all(f'{name}_{key}' not in saved or np.array_equal(
          saved[f'{name}_{key}'], now[f'{name}_{key}'], equal_nan=True)
                   for key in ('labels', 'va')):
        differences[name] = 'the same images with other labels'
  return differences


def output_dir(workdir: Path, kind: str, name: str) -> Path:
  """A new folder report/<kind>/<name> (or <name>.2, .3, ... when taken)
  for the outputs of one evaluation or prediction."""
  parent = Path(workdir) / 'report' / kind
  parent.mkdir(parents=True, exist_ok=True)
  for number in range(1, 10_000):
    folder = parent / (name if number == 1 else f'{name}.{number}')
    try:
      folder.mkdir()
      return folder
    except FileExistsError:
      continue
  raise UsageError(f'{parent}: no free name for {name}')
