"""Resuming from checkpoints: damaged ones are set aside, a failure to read
one (memory, storage) is tried again or stops the run, and nothing set
aside is ever lost."""

import errno
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from fer_jax.configs import default
from fer_jax import checkpoints

STEPS = (1, 2)
# 64x64 float32 puts w's chunk in a data file of its own, as in a real state.
STATE = {'w': np.arange(64 * 64, dtype=np.float32).reshape(64, 64),
         'b': np.ones(3, np.float32)}


@pytest.fixture(scope='module')
def saved(tmp_path_factory) -> Path:
  """A workdir with the checkpoints of STEPS, STATE in each."""
  workdir = tmp_path_factory.mktemp('saved')
  manager = checkpoints.create_manager(workdir, default.get_config())
  for step in STEPS:
    checkpoints.save(manager, step, STATE, {'step': step}, {}, None)
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
