"""Orbax checkpoints: the train state and the loop's progress, every epoch.

Each checkpoint holds two items: 'state' (parameters, BatchNorm statistics,
optimiser state, step, RNG) and 'meta' (completed epochs, the best
validation metric so far, early-stopping counters; the data iterator's
position is the epoch, as training checkpoints at epoch boundaries). The
latest `train.keep_checkpoints` and the best by `train.best_metric` are kept.
"""

from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


def create_manager(workdir: Path, config: ml_collections.ConfigDict,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """The manager of workdir/checkpoints."""
  train = config.train
  if train.best_mode not in ('max', 'min'):
    raise ValueError(f"train.best_mode: {train.best_mode!r} is not 'max' or "
                     "'min'")
  best_fn = lambda metrics: metrics[train.best_metric]
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=train.keep_checkpoints),
      checkpoint_managers.BestN(get_metric_fn=best_fn,
                                reverse=train.best_mode == 'min', n=1,
                                keep_checkpoints_without_metrics=False)])
  options = ocp.CheckpointManagerOptions(
      best_fn=best_fn, best_mode=train.best_mode, preservation_policy=policy,
      read_only=read_only, create=not read_only)
  return ocp.CheckpointManager(Path(workdir).absolute() / 'checkpoints',
                               options=options, item_names=('state', 'meta'))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict,
         metrics: dict) -> None:
  """Saves asynchronously; the previous save is finished first."""
  manager.wait_until_finished()
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
               metrics=metrics)


def restore(manager: ocp.CheckpointManager, step: int,
            template: Any) -> tuple[Any, dict]:
  """The state (shaped like template, on the host) and meta of a step."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  return restored.state, restored.meta


def checkpoint_step(manager: ocp.CheckpointManager, requested: int | None,
                    ) -> int:
  """The requested step if it exists, else the best one; raises if none."""
  steps = manager.all_steps()
  if requested is not None:
    if requested not in steps:
      raise ValueError(f'--checkpoint_step: {requested} not in '
                       f'{manager.directory} (has {sorted(steps)})')
    return requested
  step = manager.best_step()
  if step is None:
    raise FileNotFoundError(f'{manager.directory}: no checkpoint; train first '
                            '(python main.py --workdir=...)')
  return step
