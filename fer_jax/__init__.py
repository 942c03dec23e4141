"""fer_jax: facial expression recognition with JAX and Flax.

The Python API (docs/api.md). The heavy modules are imported on first use,
so that `import fer_jax` (and `fer-jax --help`) stays fast:

  fer_jax.train(config, workdir)         -> the test metrics (dict)
  fer_jax.evaluate(workdir, split='test', checkpoint_step=None, data=None,
                   tta=None)             -> the split's metrics (dict)
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


def evaluate(*args, **kwargs) -> dict:
  """Evaluates the best (or given) checkpoint of a run on one split of its
  own data, reported beside the run: --mode=evaluate. Its metrics.

    evaluate(workdir, split='test', checkpoint_step=None, data=None,
             tta=None)

  split: 'train', 'val' or 'test'. data: the data fields to change, by
  name below data. ({'layout': 'rafdb', 'root': PATH}: another data set,
  scored over the classes it shares with the model); None: the run's own
  data. tta: 'none' or 'flip'; None: the run's eval.tta.

  The old form evaluate(config, workdir, split='test',
  checkpoint_step=None) still works, with a DeprecationWarning: config's
  data fields that it read then (where the data is and how it is read,
  data.classes) count as given in data.
  """
  import ml_collections
  if (args and isinstance(args[0], ml_collections.ConfigDict)) or (
      'config' in kwargs):
    return _evaluate_config(*args, **kwargs)
  return _evaluate(*args, **kwargs)


def _evaluate(workdir: str, split: str = 'test',
              checkpoint_step: int | None = None, data: dict | None = None,
              *, tta: str | None = None) -> dict:
  """evaluate's form: a workdir, and the data fields to change."""
  from fer_jax import evaluation, inference
  config = None
  if tta is not None:
    config = inference.evaluation_config(None, workdir, {})[0]
    config.eval.tta = tta
  return evaluation.evaluate(config, workdir, split, checkpoint_step, data)


def _evaluate_config(config: 'ml_collections.ConfigDict', workdir: str,
                     split: str = 'test',
                     checkpoint_step: int | None = None) -> dict:
  """evaluate's old form, as it read the data then: deprecated."""
  import warnings
  from fer_jax import config_rules, evaluation
  warnings.warn('fer_jax.evaluate(config, workdir, ...) is deprecated: '
                "fer_jax.evaluate(workdir, split, checkpoint_step, data=...) "
                "scores the run's own data, data naming the fields to change",
                DeprecationWarning, stacklevel=3)
  # What the old form read from config: INFERENCE_FIELDS and data.classes.
  data = {field[len('data.'):]: value for field, value in
          config_rules.flatten(config.to_dict()).items()
          if field in config_rules.INFERENCE_FIELDS and
          field.startswith('data.') and field != 'data.synthetic.regenerate'}
  if config.data.get('classes', '').strip():
    data['classes'] = config.data.classes
  return evaluation.evaluate(config, workdir, split, checkpoint_step, data)


def __getattr__(name: str):
  if name == 'Recognizer':
    from fer_jax.recognizer import Recognizer
    return Recognizer
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = ['Recognizer', 'evaluate', 'train']
