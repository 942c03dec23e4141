"""fer_jax: facial expression recognition with JAX and Flax.

The Python API (README: Python API), imported on first use so that
`import fer_jax` (and main.py --help) stays fast:

  fer_jax.train(config, workdir)         -> the test metrics (dict)
  fer_jax.evaluate(config, workdir, split='test', checkpoint_step=None)
                                         -> the split's metrics (dict)
  fer_jax.Recognizer.from_workdir(workdir, checkpoint_step=None, tta='none',
                                  detector=None)
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the annotations only: `import fer_jax` stays fast
  import ml_collections


class _TrainModule(types.ModuleType):
  """fer_jax.train: the module, and callable as main.py's --mode=train."""

  def __call__(self, config: 'ml_collections.ConfigDict', workdir: str
               ) -> dict:
    """Trains config in workdir (resuming it), evaluates the best
    checkpoint on the test split and writes the report; its metrics."""
    return self.train_and_evaluate(config, workdir)


class _EvaluateModule(types.ModuleType):
  """fer_jax.evaluate: the module, and callable as --mode=evaluate."""

  def __call__(self, config: 'ml_collections.ConfigDict', workdir: str,
               split: str = 'test', checkpoint_step: int | None = None
               ) -> dict:
    """Evaluates the best (or given) checkpoint of workdir on a split
    ('train', 'val' or 'test'), reported beside the run; its metrics."""
    return self.evaluate(config, workdir, split, checkpoint_step)


# fer_jax.train and fer_jax.evaluate name modules too (train.py,
# evaluate.py): Python sets a submodule as its package's attribute when it
# is imported, by whatever import. The package gives those two modules the
# class that makes them callable then, so both `fer_jax.train(config,
# workdir)` and `from fer_jax import train; train.train_and_evaluate(...)`
# work whichever comes first.
_CALLABLE = {'train': _TrainModule, 'evaluate': _EvaluateModule}


class _Package(types.ModuleType):

  def __setattr__(self, name: str, value) -> None:
    if name in _CALLABLE and isinstance(value, types.ModuleType):
      value.__class__ = _CALLABLE[name]
    super().__setattr__(name, value)


def __getattr__(name: str):
  if name in _CALLABLE:
    return importlib.import_module(f'{__name__}.{name}')
  if name == 'Recognizer':
    from fer_jax.recognizer import Recognizer
    return Recognizer
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = ['Recognizer', 'evaluate', 'train']
sys.modules[__name__].__class__ = _Package
