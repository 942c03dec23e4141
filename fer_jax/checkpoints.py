"""Orbax checkpoints: the train state, the loop's progress and the data.

Each checkpoint holds three items: 'state' (parameters, BatchNorm
statistics, optimiser state, step, RNG), 'meta' (completed epochs, steps
into the current one and its metric sums, the best validation metric so
far, early-stopping counters) and 'data' (the training iterator: Grain's
state, the step it has reached and the worker count it was saved with).
Checkpoints come at the end of every epoch (with validation metrics) and
every `train.checkpoint_every_steps` (without). The latest
`train.keep_checkpoints` and the best by `train.best_metric` are kept.
"""

import copy
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
                               options=options,
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


def restore(manager: ocp.CheckpointManager, step: int,
            template: Any) -> tuple[Any, dict, dict]:
  """The state (shaped like template, on the host), meta and data of a step.

  data is None for checkpoints from before it was saved.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  items = {'state': ocp.args.StandardRestore(abstract),
           'meta': ocp.args.JsonRestore()}
  # Checkpoints written before the data item existed restore without it.
  has_data = (Path(manager.directory) / str(step) / 'data').exists()
  if has_data:
    items['data'] = ocp.args.JsonRestore()
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored.state, restored.meta, restored.data if has_data else None


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
