"""Orbax checkpoints: the train state, the loop's progress and the data.

Each checkpoint holds three items: 'state' (parameters, BatchNorm
statistics, optimiser state, step, RNG), 'meta' (the training loop's
progress: steps done, the current epoch's metric sums, the best checkpoint
so far, early-stopping counters) and 'data' (the training iterator: Grain's
state per process, the step its dataset starts at and the worker count it
was saved with). Checkpoints come at the end of every epoch (ranked by
their validation metric) and every `train.checkpoint_every_steps` steps.
The latest `train.keep_checkpoints` and the best are kept; among equal
values the best is the earliest, the rule the loop's progress follows, so
the best step recorded and the checkpoint kept are the same one.

Each checkpoint gets its manifests of checksums once Orbax has committed
it, and every restore checks its files against them (manifests.py).
"""

import concurrent.futures
import copy
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from fer_jax import distributed, manifests
from fer_jax.config_rules import UsageError
from fer_jax.errors import describe
from fer_jax.manifests import DamagedCheckpoint
from fer_jax.steps import TRAINING_RULES


@dataclasses.dataclass
class EarliestBest:
  """Preserves the first checkpoint with the best value of `metric`."""
  metric: str
  mode: str  # 'max' | 'min'

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any
                      ) -> list[bool]:
    del context
    ranked = [c for c in checkpoints if c.metrics is not None]
    if not ranked:
      return [False] * len(checkpoints)
    pick = max if self.mode == 'max' else min
    best = pick(c.metrics[self.metric] for c in ranked)
    keep = min(c.step for c in ranked if c.metrics[self.metric] == best)
    return [c.step == keep for c in checkpoints]


@dataclasses.dataclass
class Progress:
  """Where the loop is: each checkpoint's 'meta' item."""
  step: int = 0                   # steps done, over the whole run
  epoch_sums: dict = dataclasses.field(default_factory=dict)  # this epoch's
  best_value: float | None = None
  best_step: int | None = None    # the first step with best_value
  epochs_without_improvement: int = 0
  stopped_early: bool = False
  train_seconds: float = 0.0      # training and validation, all sessions
  training_rules: int = TRAINING_RULES  # the step's, from the start

  @classmethod
  def from_meta(cls, meta: dict, steps_per_epoch: int) -> 'Progress':
    """From a checkpoint's meta item; older ones counted epochs."""
    if 'step' not in meta:
      best = meta.get('best_epoch')
      meta = {**meta, 'step': (meta['epoch'] * steps_per_epoch +
                               meta.get('epoch_step', 0)),
              'best_step': best * steps_per_epoch if best else None}
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in meta.items() if k in names})


class Manager(ocp.CheckpointManager):
  """Orbax's CheckpointManager, whose checkpoints get their manifests."""

  def __init__(self, *args, **kwargs):
    self.verified = set()  # steps whose files verify
    self._signing = None   # the manifest of the step saved last
    self._signer = concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix='checkpoint_manifest')
    super().__init__(*args, **kwargs)

  def save(self, step: int, *args, **kwargs) -> bool:
    """Orbax's save; each process's manifest follows the commit, written
    in the background as Orbax commits, so that a crash long after the
    save does not leave the checkpoint without it."""
    self.wait_until_finished()
    if distributed.is_primary():
      # Before the checkpoint: from here on, one without manifests is
      # known incomplete.
      manifests.mark(Path(self.directory), step)
    saved = super().save(step, *args, **kwargs)
    if saved:
      self._signing = self._signer.submit(self._sign, step)
    return saved

  def _sign(self, step: int) -> None:
    """Writes this process's manifest of step once Orbax has committed it."""
    ocp.CheckpointManager.wait_until_finished(self)  # Orbax's, not ours
    manifests.write(Path(self.directory) / str(step), jax.process_index(),
                    jax.process_count())

  def wait_until_finished(self) -> None:
    """Orbax's, then the manifest of the step saved last."""
    signing, self._signing = self._signing, None
    try:
      super().wait_until_finished()
    finally:
      if signing is not None:
        signing.result()

  def close(self) -> None:
    """Orbax's, once the last manifest is written."""
    super().close()
    self._signer.shutdown()

  def _get_metrics(self, step: int) -> Any:
    """Orbax's, with an unparsable metrics file read as none: Orbax reads
    every checkpoint's when the manager starts, and would fail there; the
    checkpoint's verification names it as damage."""
    try:
      return super()._get_metrics(step)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
      logging.warning('%s/%d/metrics/metrics is unreadable (%s)',
                      self.directory, step, describe(e))
      return None


def verify(manager: Manager, step: int, item: str | None = None) -> None:
  """Checks every file of step's checkpoint (or of one of its items)
  against its manifests; DamagedCheckpoint names the first that differs
  or is missing."""
  if step not in manager.verified:
    manifests.check(Path(manager.directory), step, item)
    if item is None:
      manager.verified.add(step)


def create_manager(workdir: Path, config: ml_collections.ConfigDict,
                   read_only: bool = False) -> Manager:
  """The manager of workdir/checkpoints."""
  train = config.train
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=train.keep_checkpoints),
      EarliestBest(train.best_metric, train.best_mode)])
  # best_fn only makes Orbax store each checkpoint's metrics for the
  # policy; the best step comes from the loop's progress (best_step).
  options = ocp.CheckpointManagerOptions(
      best_fn=lambda metrics: metrics[train.best_metric],
      best_mode=train.best_mode, preservation_policy=policy,
      read_only=read_only, create=not read_only,
      cleanup_tmp_directories=not read_only)
  return Manager(Path(workdir).absolute() / 'checkpoints', options=options,
                 item_names=('state', 'meta', 'data'))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict,
         data: dict, metrics: dict | None) -> None:
  """Saves asynchronously; the previous save is finished first.

  metrics: the validation metrics that rank it, None mid-epoch.
  """
  manager.wait_until_finished()
  # Copies: the JSON items are written in the background, while the
  # caller goes on changing its dicts.
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      meta=ocp.args.JsonSave(copy.deepcopy(meta)),
      data=ocp.args.JsonSave(copy.deepcopy(data))), metrics=metrics)


def restore(manager: Manager, step: int,
            template: Any) -> tuple[Any, dict, dict | None]:
  """The state (shaped like template, on the host), meta and data of a
  step whose files verify (DamagedCheckpoint names one that does not).

  data is None for checkpoints from before it was saved.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  items = {'state': ocp.args.StandardRestore(abstract),
           'meta': ocp.args.JsonRestore()}
  # Checkpoints written before the data item existed restore without it.
  has_data = (Path(manager.directory) / str(step) / 'data').exists()
  if has_data:
    items['data'] = ocp.args.JsonRestore()
  # The files are verified after Orbax's read (before any of it is
  # returned), and where it fails on damage, to name the file.
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as error:
    if is_damaged(error):
      verify(manager, step)
    raise
  verify(manager, step)
  return restored.state, restored.meta, restored.data if has_data else None


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  """The meta item of a step alone."""
  return manager.restore(step, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore())).meta


# A read that fails without showing the checkpoint damaged (a MemoryError,
# an I/O error of network storage) is tried READ_TRIES times in all, waiting
# READ_BACKOFF_SECONDS, then twice that, ... in between.
READ_TRIES = 3
READ_BACKOFF_SECONDS = 2.0

# What reading a checkpoint with a file missing, truncated or corrupted
# raises (each file of a saved one tried): JSONDecodeError, UnicodeDecodeError
# and FileNotFoundError for the JSON files, Orbax's KeyError for an item's
# folder, and TensorStore's ValueErrors, which start with their status code:
# these three, or no code (INVALID_ARGUMENT) or FAILED_PRECONDITION with a
# decoding failure. TensorStore gives EIO, ESTALE and ETIMEDOUT as
# FAILED_PRECONDITION and ENOMEM as RESOURCE_EXHAUSTED: not damage.
_DAMAGED_CODES = ('NOT_FOUND:', 'DATA_LOSS:', 'OUT_OF_RANGE:')
_UNDECODABLE = ('Error decoding', 'ZSTD_decompressStream() failed')


def is_damaged(error: BaseException) -> bool:
  """Whether error (or what it was raised from) shows the checkpoint's files
  missing, truncated or unparsable, not a failure to read them."""
  while error is not None:
    if isinstance(error, (DamagedCheckpoint, FileNotFoundError,
                          json.JSONDecodeError, UnicodeDecodeError)):
      return True
    if isinstance(error, KeyError) and 'not found in the checkpoint' in str(
        error):
      return True
    if type(error) is ValueError and (  # TensorStore's, not a subclass
        str(error).startswith(_DAMAGED_CODES) or
        any(failure in str(error) for failure in _UNDECODABLE)):
      return True
    error = error.__cause__
  return False


def _read_retrying(read: Callable[[int], Any], step: int, where: str
                   ) -> tuple[Any, Exception | None]:
  """(read(step), None), or (None, the error) once it shows the checkpoint
  damaged or READ_TRIES tries failed. A UsageError is raised at once."""
  for attempt in range(READ_TRIES):
    try:
      return read(step), None
    except UsageError:  # read refuses it: no checkpoint of the run would do
      raise
    except Exception as e:  # noqa: BLE001  judged by the caller
      if is_damaged(e) or attempt + 1 == READ_TRIES:
        return None, e
      wait = READ_BACKOFF_SECONDS * 2**attempt
      logging.warning('%s: %s; trying again in %g s', where, describe(e),
                      wait)
      time.sleep(wait)


def _stop(where: str, error: Exception | None) -> None:
  """Raises error (None: it came in another process), saying that no
  checkpoint moves."""
  if error is None:
    raise RuntimeError(f'{where} could not be read in another process; no '
                       'checkpoint was moved')
  error.add_note(f'{where} could not be read ({READ_TRIES} tries) and the '
                 'error does not show it damaged; no checkpoint was moved. '
                 'Run again once the memory or the storage is back.')
  raise error


def _read_everywhere(manager: ocp.CheckpointManager,
                     read: Callable[[int], Any], step: int
                     ) -> tuple[Any, bool]:
  """(read(step), True) where it reads in every process; (None, False),
  with a warning, where it shows the checkpoint damaged in any. A
  UsageError from read is raised at once; any other error that persists
  (see _read_retrying) and does not show the checkpoint damaged stops
  every process, with nothing moved."""
  where = f'{manager.directory}/{step}'
  value, error = _read_retrying(read, step, where)
  failed = error is not None and not is_damaged(error)
  # Every process resumes from the same step, or the steps' collectives
  # would pair different work.
  if not distributed.everyone(not failed):
    _stop(where, error if failed else None)
  if distributed.everyone(error is None):
    return value, True
  logging.warning('%s is unreadable (%s)', where,
                  describe(error) if error else 'in another process')
  return None, False


def latest_complete(manager: ocp.CheckpointManager,
                    read: Callable[[int], Any]) -> tuple[int, Any, list]:
  """(step, read(step)) of the latest checkpoint that reads in every
  process, and the later steps that did not as they are damaged, each with
  a warning (see _read_everywhere).

  (None, None, []) without checkpoints; UsageError naming the folder when
  none reads.
  """
  broken = []
  for step in sorted(manager.all_steps(), reverse=True):
    value, complete = _read_everywhere(manager, read, step)
    if complete:
      return step, value, broken
    broken.append(step)
  if broken:
    raise UsageError(f'{manager.directory}: no checkpoint is complete '
                     f'(steps {sorted(broken)} are unreadable)')
  return None, None, []


def sound(manager: Manager, step: int) -> bool:
  """Whether step's files verify in every process (a warning names the
  first that does not)."""
  return _read_everywhere(manager, lambda s: verify(manager, s), step)[1]


def set_aside(workdir: Path, steps: list[int]) -> None:
  """Moves unreadable checkpoints out of Orbax's way, to
  workdir/checkpoints_unreadable/<step>, where they stay for a look; if
  that is taken (set aside before), to <step>.2, <step>.3, ..."""
  folder = Path(workdir) / 'checkpoints_unreadable'
  for step in steps:
    folder.mkdir(exist_ok=True)
    target, copies = folder / str(step), 1
    while target.exists():
      copies += 1
      target = folder / f'{step}.{copies}'
    shutil.move(Path(workdir) / 'checkpoints' / str(step), target)


def best_kept(manager: ocp.CheckpointManager, recorded: int | None,
              train: ml_collections.ConfigDict) -> int:
  """recorded, the best step of the run's progress, if its checkpoint is
  kept; else (a run saved before best_step existed, or resumed from an
  earlier checkpoint after the one that had replaced it became unreadable)
  the earliest best of those kept, with a warning."""
  steps = manager.all_steps()
  if recorded in steps:
    return recorded
  ranked = {step: manager.metrics(step) for step in steps}
  ranked = {s: m[train.best_metric] for s, m in ranked.items() if m}
  if not ranked:
    raise UsageError(f'{manager.directory}: no checkpoint of an epoch\'s '
                     'end to test')
  pick = max if train.best_mode == 'max' else min
  best = pick(ranked.values())
  step = min(s for s, v in ranked.items() if v == best)
  logging.warning('%s: the best step recorded (%s) is not kept; using %d, '
                  'the best of those kept', manager.directory, recorded, step)
  return step


def _verified_meta(manager: Manager, step: int) -> dict:
  """The meta item of a step, its files verified."""
  verify(manager, step, 'meta')
  return read_meta(manager, step)


def best_step(manager: Manager, train: ml_collections.ConfigDict) -> int:
  """The best step as the run's latest readable progress records it;
  where that checkpoint is damaged, the newest sound one, with a warning."""
  step, meta, _ = latest_complete(manager,
                                  lambda s: _verified_meta(manager, s))
  if step is None:
    raise UsageError(f'{manager.directory}: no checkpoint; train first '
                     '(python main.py --workdir=...)')
  best = best_kept(manager, meta.get('best_step'), train)
  if sound(manager, best):
    return best
  newest, _, _ = latest_complete(manager, lambda s: verify(manager, s))
  logging.warning('%s/%d, the best checkpoint, is damaged; using step %d, '
                  'the newest sound one', manager.directory, best, newest)
  return newest


def checkpoint_step(manager: Manager, requested: int | None,
                    train: ml_collections.ConfigDict) -> int:
  """The requested step if it exists and its files verify
  (DamagedCheckpoint names one that does not), else the best one."""
  if requested is None:
    return best_step(manager, train)
  steps = manager.all_steps()
  if requested not in steps:
    raise UsageError(f'--checkpoint_step: {requested} not in '
                     f'{manager.directory} (has {sorted(steps)})')
  verify(manager, requested)
  return requested
