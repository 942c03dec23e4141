"""Resuming from checkpoints: damaged ones are set aside, a failure to read
one (memory, storage) is tried again or stops the run, and nothing set
aside is ever lost. Each checkpoint's files are checked against its
manifests: a damaged one is never restored as if sound, and evaluate,
predict and export refuse it by name or use another, moving nothing."""

import errno
import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from fer_jax.configs import default
from fer_jax import checkpoints, evaluation, inference, manifests, training
from fer_jax.errors import DataError
from fer_jax.recognizer import Recognizer
from tests.conftest import tree_digest

STEPS = (1, 2)
# 64x64 float32 puts w's chunk in a data file of its own, as in a real state.
STATE = {'w': np.arange(64 * 64, dtype=np.float32).reshape(64, 64),
         'b': np.ones(3, np.float32)}


@pytest.fixture(scope='module')
def saved(tmp_path_factory) -> Path:
  """A workdir with the checkpoints of STEPS, STATE in each."""
  workdir = tmp_path_factory.mktemp('saved')
  manager = checkpoints.create_manager(workdir, default.get_config())
  for step in STEPS:  # ranked, as at the end of an epoch
    checkpoints.save(manager, step, STATE, {'step': step}, {},
                     {'val_macro_f1': step / 10})
  manager.close()
  return workdir


@pytest.fixture
def workdir(saved, tmp_path, monkeypatch) -> Path:
  """A copy of saved; retries do not wait."""
  monkeypatch.setattr(checkpoints, 'READ_BACKOFF_SECONDS', 0)
  shutil.copytree(saved, tmp_path / 'run')
  return tmp_path / 'run'


def contents(workdir: Path) -> list[str]:
  """Every path below workdir, relative to it."""
  return sorted(str(p.relative_to(workdir)) for p in workdir.rglob('*'))


def resume(workdir: Path, failing: Callable | None = None
           ) -> tuple[int, dict]:
  """(step, state) as train.py resumes: the latest complete checkpoint, the
  later ones set aside. failing(original restore) replaces Orbax's."""
  manager = checkpoints.create_manager(workdir, default.get_config(),
                                       read_only=True)
  if failing:
    manager.restore = failing(manager.restore)
  try:
    step, restored, broken = checkpoints.latest_complete(
        manager, lambda s: checkpoints.restore(manager, s, STATE))
  finally:
    manager.close()
  checkpoints.set_aside(workdir, broken)
  return step, restored[0]


def failing_times(error: BaseException | None, times: int,
                  calls: list) -> Callable:
  """A failing for resume: raises error the first `times` calls."""
  def wrap(restore):
    def flaky(*args, **kwargs):
      calls.append(args[0])
      if len(calls) <= times:
        raise error
      return restore(*args, **kwargs)
    return flaky
  return wrap


@pytest.mark.parametrize('error', [
    OSError(errno.EIO, 'Input/output error'),
    OSError(errno.ESTALE, 'Stale file handle'),
    MemoryError(),
    # TensorStore's EIO reading a file, its status code in front.
    ValueError('FAILED_PRECONDITION: Error reading local file "x/d/ab": '
               '[OS error: Input/output error]')])
def test_a_transient_error_is_retried_and_moves_nothing(workdir, error):
  before, calls = contents(workdir), []
  step, state = resume(workdir, failing_times(error, 1, calls))
  assert step == 2 and calls == [2, 2]
  np.testing.assert_array_equal(state['w'], STATE['w'])
  assert contents(workdir) == before


@pytest.mark.parametrize('error', [
    MemoryError(), OSError(errno.ETIMEDOUT, 'Connection timed out')])
def test_a_persistent_error_stops_naming_the_step_and_moves_nothing(
    workdir, error):
  before, calls = contents(workdir), []
  with pytest.raises(type(error)) as raised:
    resume(workdir, failing_times(error, 99, calls))
  assert calls == [2] * checkpoints.READ_TRIES
  assert f"{workdir / 'checkpoints' / '2'} could not be read" in ''.join(
      raised.value.__notes__)
  assert contents(workdir) == before


def test_an_interrupt_is_not_retried(workdir):
  before, calls = contents(workdir), []
  with pytest.raises(KeyboardInterrupt):
    resume(workdir, failing_times(KeyboardInterrupt(), 99, calls))
  assert calls == [2] and contents(workdir) == before


def test_a_failure_in_another_process_stops_this_one(workdir, monkeypatch):
  before = contents(workdir)
  # The first question, whether every process read step 2 or found it
  # damaged, is answered no.
  monkeypatch.setattr(checkpoints.distributed, 'everyone', lambda flag: False)
  with pytest.raises(RuntimeError, match='/2 could not be read in another '
                     'process; no checkpoint was moved'):
    resume(workdir)
  assert contents(workdir) == before


def cut(path: Path) -> None:
  """Truncates path to half its length."""
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def flip(path: Path, at: int = 20) -> None:
  """Inverts the bits of byte `at` of path."""
  data = bytearray(path.read_bytes())
  data[at] ^= 0xFF
  path.write_bytes(bytes(data))


def only(pattern: str) -> Callable:
  """The first path below a checkpoint's folder that matches pattern."""
  return lambda folder: [next(iter(sorted(folder.glob(pattern))))]


def chunk(folder: Path) -> list[Path]:
  """w's chunk: the largest data file."""
  return [max(folder.glob('state/ocdbt.*/d/*'), key=lambda p: p.stat().st_size)]


# (how, which files) -> what Orbax and TensorStore raise for it.
DAMAGE = {
    'every state file cut': (cut, lambda f: [
        p for p in f.glob('state/**/*') if p.is_file()]),  # JSONDecodeError
    'meta cut': (cut, only('meta/metadata')),               # JSONDecodeError
    'meta deleted': (Path.unlink, only('meta/metadata')),   # FileNotFoundError
    'state metadata flipped': (flip, only('state/_METADATA')),  # Unicode...
    'manifest cut': (cut, only('state/manifest.ocdbt')),    # DATA_LOSS
    'b-tree deleted': (Path.unlink, only('state/d/*')),     # NOT_FOUND
    'b-tree flipped': (flip, only('state/d/*')),            # INVALID_ARGUMENT
    'chunk cut': (cut, chunk),                              # OUT_OF_RANGE
    'chunk flipped': (lambda p: flip(p, 0), chunk),  # FAILED_PRECONDITION
    'state deleted': (shutil.rmtree, only('state')),        # KeyError
}


@pytest.mark.parametrize('damage', DAMAGE)
def test_a_damaged_checkpoint_is_set_aside_at_once(workdir, damage):
  how, which = DAMAGE[damage]
  for path in which(workdir / 'checkpoints' / '2'):
    how(path)
  calls = []
  step, state = resume(workdir, failing_times(None, 0, calls))
  assert step == 1 and calls == [2, 1]
  np.testing.assert_array_equal(state['w'], STATE['w'])
  assert not (workdir / 'checkpoints' / '2').exists()
  assert (workdir / 'checkpoints_unreadable' / '2' /
          '_CHECKPOINT_METADATA').is_file()


def test_setting_aside_a_step_again_keeps_every_copy(tmp_path):
  for copy in ('first', 'second', 'third'):
    (tmp_path / 'checkpoints' / '7').mkdir(parents=True)
    (tmp_path / 'checkpoints' / '7' / copy).touch()
    checkpoints.set_aside(tmp_path, [7])
  aside = tmp_path / 'checkpoints_unreadable'
  assert contents(aside) == ['7', '7.2', '7.2/second', '7.3', '7.3/third',
                             '7/first']
  assert not (tmp_path / 'checkpoints' / '7').exists()


def unchecked_warnings(caplog) -> list[str]:
  """The warnings that checkpoints without manifests are read unchecked."""
  return [r.getMessage() for r in caplog.records
          if r.levelno == logging.WARNING and 'without manifests' in
          r.getMessage()]


def remove_manifests(workdir: Path, steps=STEPS) -> None:
  """workdir's checkpoints of steps as a version before manifests left
  them: without manifests, and (for all of them) without the marker."""
  for step in steps:
    for manifest in (workdir / 'checkpoints' / str(step)).glob('manifest.*'):
      manifest.unlink()
  if set(steps) == set(STEPS):
    (workdir / 'checkpoints' / manifests.MARKER).unlink()


def test_each_checkpoint_has_a_manifest_of_every_file(saved):
  folder = saved / 'checkpoints' / '2'
  manifest = json.loads((folder / 'manifest.0.json').read_text())
  assert manifest['processes'] == 1
  written = sorted(str(p.relative_to(folder)) for p in folder.rglob('*')
                   if p.is_file() and p.name != 'manifest.0.json')
  assert sorted(manifest['files']) == written
  assert json.loads((saved / 'checkpoints' / manifests.MARKER
                     ).read_text()) == {'from_step': 1}


def test_a_flipped_byte_in_any_file_is_named_and_set_aside(
    saved, tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(checkpoints, 'READ_BACKOFF_SECONDS', 0)
  folder = saved / 'checkpoints' / '2'
  names = sorted(p.relative_to(folder) for p in folder.rglob('*')
                 if p.is_file())
  assert len(names) > 10  # the items' files, Orbax's records, the manifest
  for i, name in enumerate(names):
    workdir = tmp_path / str(i)
    shutil.copytree(saved, workdir)
    path = workdir / 'checkpoints' / '2' / name
    flip(path, path.stat().st_size // 2)
    caplog.clear()
    step, state = resume(workdir)
    assert step == 1, name
    np.testing.assert_array_equal(state['w'], STATE['w'])
    assert (workdir / 'checkpoints_unreadable' / '2' / name).is_file()
    named = 'manifest.0.json' if 'manifest' in str(name) else (
        f'{name} is damaged')
    assert f"{workdir / 'checkpoints' / '2'}: " in caplog.text, name
    assert named in caplog.text, name


def test_a_checkpoint_without_its_manifest_is_incomplete(workdir, caplog):
  (workdir / 'checkpoints' / '2' / 'manifest.0.json').unlink()
  step, _ = resume(workdir)
  assert step == 1
  assert (f"{workdir / 'checkpoints' / '2'}: manifest.0.json is missing, "
          'so the checkpoint is incomplete') in caplog.text
  assert (workdir / 'checkpoints_unreadable' / '2').is_dir()
  assert not unchecked_warnings(caplog)


def test_another_process_s_manifest_is_required_and_checked(tmp_path):
  """Each process lists the files it wrote; all are needed."""
  folder = tmp_path / 'checkpoints' / '5'
  for name, text in (('meta/metadata', '{}'),
                     ('state/ocdbt.process_1/d/ab', 'chunk'),
                     ('state/array_metadatas/process_1', '[]')):
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
  manifests.write(folder, 0, 2)
  manifests.write(folder, 1, 2)
  listed = lambda p: sorted(json.loads(
      (folder / f'manifest.{p}.json').read_text())['files'])
  assert listed(0) == ['meta/metadata']
  assert listed(1) == ['state/array_metadatas/process_1',
                       'state/ocdbt.process_1/d/ab']
  manifests.check(tmp_path / 'checkpoints', 5)
  flip(folder / 'state/ocdbt.process_1/d/ab', 0)
  with pytest.raises(DataError, match='/5: state/ocdbt.process_1/d/ab is '
                     'damaged: its SHA-256 is not the one manifest.1.json '
                     'records'):
    manifests.check(tmp_path / 'checkpoints', 5)
  (folder / 'manifest.1.json').unlink()
  with pytest.raises(DataError, match=r'/5: manifest.1.json is missing, so '
                     r'the checkpoint is incomplete \(manifest.0.json records '
                     r'2 processes\)'):
    manifests.check(tmp_path / 'checkpoints', 5)


def test_an_older_version_s_checkpoints_restore_with_one_warning(
    workdir, caplog):
  remove_manifests(workdir)
  before = contents(workdir)
  step, state = resume(workdir)
  assert step == 2 and contents(workdir) == before
  np.testing.assert_array_equal(state['w'], STATE['w'])
  # Evaluate's way too, with a manager of its own: still one warning.
  manager = checkpoints.create_manager(workdir, default.get_config(),
                                       read_only=True)
  checkpoints.restore(manager, checkpoints.checkpoint_step(
      manager, 1, default.get_config().train), STATE)
  manager.close()
  assert len(unchecked_warnings(caplog)) == 1
  assert f"{workdir / 'checkpoints'}: checkpoints without manifests" in (
      unchecked_warnings(caplog)[0])


def test_a_resumed_older_run_checks_only_its_new_checkpoints(workdir,
                                                             caplog):
  """An older version saved step 1; this one, from step 2 (the marker's)."""
  remove_manifests(workdir, [1])
  (workdir / 'checkpoints' / manifests.MARKER).write_text(
      '{"from_step": 2}')
  assert resume(workdir)[0] == 2
  assert not unchecked_warnings(caplog)
  (workdir / 'checkpoints' / '2' / 'manifest.0.json').unlink()
  assert resume(workdir)[0] == 1
  assert 'manifest.0.json is missing' in caplog.text
  assert len(unchecked_warnings(caplog)) == 1


@pytest.mark.parametrize('saved_by', ['this version', 'an older one'])
@pytest.mark.parametrize('how', ['truncated', 'garbage'])
def test_a_damaged_metrics_file_is_damage_not_a_crash(workdir, caplog,
                                                      saved_by, how):
  if saved_by == 'an older one':
    remove_manifests(workdir)
  path = workdir / 'checkpoints' / '2' / 'metrics' / 'metrics'
  if how == 'truncated':
    cut(path)
  else:
    path.write_bytes(b'\x00\xff{"val_macro_f1": ]')
  step, _ = resume(workdir)  # create_manager reads every metrics file
  assert step == 1
  assert (f"{workdir / 'checkpoints' / '2'}: metrics/metrics is"
          in caplog.text)
  assert (workdir / 'checkpoints_unreadable' / '2').is_dir()


# With a run: training sets damage aside; evaluate, predict and export
# refuse it or use another, and move nothing.

def steps_of(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()
                if p.name.isdigit())


def damage(workdir: Path, step: int) -> str:
  """Flips a byte in the middle of step's largest file; 'FOLDER: FILE'."""
  folder = workdir / 'checkpoints' / str(step)
  path = chunk(folder)[0]
  flip(path, path.stat().st_size // 2)
  return f'{folder}: {path.relative_to(folder)}'


def test_training_sets_a_damaged_latest_checkpoint_aside(finished, caplog):
  config, workdir, metrics = finished
  shutil.rmtree(workdir / 'report')  # as if killed before its report
  last = steps_of(workdir)[-1]
  named = damage(workdir, last)
  result = training.train_and_evaluate(config, str(workdir))
  assert f'{named} is damaged' in caplog.text
  assert (workdir / 'checkpoints_unreadable' / str(last)).is_dir()
  # Resumed before it: the same run, to the same report.
  assert result['checkpoint_step'] == metrics['checkpoint_step']
  assert result['accuracy'] == pytest.approx(metrics['accuracy'])


def test_training_sets_a_damaged_best_checkpoint_aside(finished, caplog):
  """Killed before step 18: step 16's progress records step 9 the best."""
  config, workdir, _ = finished
  shutil.rmtree(workdir / 'report')
  shutil.rmtree(workdir / 'checkpoints' / '18')
  named = damage(workdir, 9)
  result = training.train_and_evaluate(config, str(workdir))
  assert f'{named} is damaged' in caplog.text
  assert (workdir / 'checkpoints_unreadable' / '9').is_dir()
  assert result['checkpoint_step'] != 9 and 9 not in steps_of(workdir)


def test_a_damaged_step_asked_for_is_refused_by_name(finished):
  config, workdir, _ = finished
  step = steps_of(workdir)[0]
  named = damage(workdir, step)
  before = tree_digest(workdir)
  refusals = (
      lambda: evaluation.evaluate(config, str(workdir), 'val',
                                  checkpoint_step=step),
      lambda: Recognizer.from_workdir(workdir, step, detector='none'),
      lambda: inference.find_step(inference.trained_config(config, workdir),
                                  workdir, step))  # export's
  for refused in refusals:
    with pytest.raises(DataError) as raised:
      refused()
    assert str(raised.value).startswith(f'{named} is damaged')
    assert '\n' not in str(raised.value)
  assert tree_digest(workdir) == before


def test_a_damaged_best_gives_the_newest_sound_checkpoint(finished, caplog):
  config, workdir, metrics = finished
  best = metrics['checkpoint_step']
  newest = max(s for s in steps_of(workdir) if s != best)
  named = damage(workdir, best)
  before = tree_digest(workdir, skip=('report/eval',))
  assert evaluation.evaluate(config, str(workdir), 'val')[
      'checkpoint_step'] == newest
  assert Recognizer.from_workdir(workdir, detector='none').step == newest
  assert inference.find_step(inference.trained_config(config, workdir),
                             workdir, None) == newest
  assert f'{named} is damaged' in caplog.text
  assert (f"{workdir / 'checkpoints'}/{best}, the best checkpoint, is "
          f'damaged; using step {newest}, the newest sound one') in caplog.text
  assert tree_digest(workdir, skip=('report/eval',)) == before
