"""fer_jax: facial expression recognition with JAX and Flax.

The Python API (docs/api.md). The heavy modules are imported on first use,
so that `import fer_jax` (and `fer-jax --help`) stays fast:

  fer_jax.train(config, workdir)         -> the test metrics (dict)
  fer_jax.evaluate(config, workdir, split='test', checkpoint_step=None)
                                         -> the split's metrics (dict)
  fer_jax.Recognizer.from_workdir(workdir, checkpoint_step=None, tta='none',
                                  detector=None)
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the annotations only: `import fer_jax` stays fast
  import ml_collections


def train(config: 'ml_collections.ConfigDict', workdir: str) -> dict:
  """Trains config in workdir (resuming it), evaluates the best checkpoint
  on the test split and writes the report: --mode=train. Its metrics."""
  from fer_jax import training
  return training.train_and_evaluate(config, workdir)


def evaluate(config: 'ml_collections.ConfigDict', workdir: str,
             split: str = 'test', checkpoint_step: int | None = None) -> dict:
  """Evaluates the best (or given) checkpoint of workdir on a split
  ('train', 'val' or 'test'), reported beside the run: --mode=evaluate.
  Its metrics."""
  from fer_jax import evaluation
  return evaluation.evaluate(config, workdir, split, checkpoint_step)


def __getattr__(name: str):
  if name == 'Recognizer':
    from fer_jax.recognizer import Recognizer
    return Recognizer
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = ['Recognizer', 'evaluate', 'train']
