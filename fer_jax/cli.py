"""The command line: fer-jax (or python main.py) [--config=...] [--workdir=...]
[--mode=...]. Flags, the processes' set-up, then one call into the mode's
module."""

import logging as python_logging
import os
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from fer_jax import hugepages

FLAGS = flags.FLAGS
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CONFIGS = Path(PACKAGE_DIR) / 'configs'  # also ./configs in the repository


# What ml_collections raises for a --config file that does not load, or an
# override of a field the config lacks.
_CONFIG_ERRORS = (AttributeError, KeyError, OSError, SyntaxError, ImportError)


def _config_error(error: Exception) -> str:
  """One line for a --config file that does not load or an override of no
  field (ml_collections reads them as the flag is defined)."""
  if isinstance(error, (AttributeError, KeyError)):
    return f'a --config override names no field of the config: {error}'
  return f"--config: {' '.join(str(error).split())}"


def config_path(value: str) -> str:
  """A --config value as given, or, where its file is not under the
  working folder, the same file of the installed package's configs:
  `--config=configs/rafdb.py` works from any folder."""
  path, colon, argument = value.partition(':')
  parts = Path(path).parts
  if (not os.path.exists(path) and len(parts) > 1 and parts[0] == 'configs'
      and CONFIGS.joinpath(*parts[1:]).exists()):
    path = str(CONFIGS.joinpath(*parts[1:]))
  return path + colon + argument


def _config_args(argv: list[str]) -> list[str]:
  """argv with each --config value resolved by config_path."""
  argv = list(argv)
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      argv[i] = '--config=' + config_path(arg[len('--config='):])
    elif arg == '--config' and i + 1 < len(argv):
      argv[i + 1] = config_path(argv[i + 1])
  return argv


def define_flags() -> None:
  """main.py's flags (the default config is read as it is defined)."""
  try:
    config_flags.DEFINE_config_file('config', str(CONFIGS / 'default.py'),
                                    'Experiment config file.',
                                    lock_config=True)
  except _CONFIG_ERRORS as e:
    sys.exit(f'fer_jax: {_config_error(e)}')
  flags.DEFINE_string('workdir', 'runs/default', 'Where the run writes; '
                      'ablate: runs/ablations/<config file name> by default.')
  flags.DEFINE_enum('mode', 'train',
                    ['train', 'evaluate', 'predict', 'export', 'import',
                     'benchmark', 'ablate'],
                    'What to do.')
  flags.DEFINE_string('input', None,
                      'predict: an image, a video, or a folder of them.')
  flags.DEFINE_string('split', 'test', 'evaluate: train, val or test.')
  flags.DEFINE_integer('checkpoint_step', None,
                       'evaluate/predict/export: this step instead of the '
                       'best.')
  flags.DEFINE_string('coordinator_address', None,
                      'Several processes: host:port of process 0 (under '
                      'SLURM, Open MPI or on a TPU pod: found by JAX).')
  flags.DEFINE_integer('num_processes', None, 'Several processes: how many.')
  flags.DEFINE_integer('process_id', None,
                       'Several processes: this one, 0..N-1.')
  for name in ('config', 'workdir', 'mode', 'input', 'split',
               'checkpoint_step', 'coordinator_address', 'num_processes',
               'process_id'):  # --helpshort lists the program's flags
    FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])


def data_overrides() -> dict:
  """The data fields the command line sets explicitly
  (--config.data.<field>=...), by their name below data.: evaluate reads
  every other from the run (a --config file chooses no data for it)."""
  values = config_flags.get_override_values(FLAGS['config'])
  return {field[len('data.'):]: value for field, value in values.items()
          if field.startswith('data.')}


def _note_unread_data() -> None:
  """Warns of --config.data.<field>= given to predict or export, which
  take every data field from the run."""
  given = sorted(data_overrides())
  if given:
    logging.warning('--mode=%s reads no data and takes the run\'s data '
                    'fields: --config.data.%s not read', FLAGS.mode,
                    ', --config.data.'.join(given))


def _quiet_libraries(record) -> bool:
  """Keeps INFO lines of fer_jax; libraries (Orbax, JAX) speak at WARNING.

  Orbax warns that mid-epoch checkpoints carry no metrics and that a
  manager opened to read is read-only: both by design.
  """
  ours = record.pathname.startswith(PACKAGE_DIR + os.sep)
  if any(known in str(record.msg) for known in (
      'did not provide metrics', 'read_only=True', 'directory is read only')):
    return False
  return record.levelno >= python_logging.WARNING or ours


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, its mistakes in one line: a --config override of
  no field or of the wrong type, a config file that does not load."""
  try:
    return FLAGS(_config_args(argv))
  except flags.Error as error:
    sys.exit(f'fer_jax: {error} (--helpshort lists the flags)')
  except _CONFIG_ERRORS as e:
    sys.exit(f'fer_jax: {_config_error(e)}')


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_quiet_libraries)
  try:
    'model' in FLAGS.config  # a config file that did not load raises here
  except _CONFIG_ERRORS as e:
    sys.exit(f'fer_jax: {_config_error(e)}')
  from fer_jax.errors import DataError, UsageError  # after flags: fast --help
  try:
    run_mode()
  except (UsageError, DataError) as error:  # the user's to fix: one line
    if FLAGS.verbosity >= 1:  # -v 1: with its traceback
      raise
    sys.exit(f'fer_jax: {error}')


def run_mode() -> None:
  """Sets up the processes, then runs the chosen mode."""
  if FLAGS.mode == 'ablate':
    run_ablation()
    return
  import jax
  from fer_jax import distributed
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                         FLAGS.process_id)
  if not distributed.is_primary():
    logging.set_verbosity(logging.WARNING)  # process 0 tells the story
  logging.info('JAX devices: %d in %d processes, %s here', jax.device_count(),
               jax.process_count(), jax.local_devices())
  logging.info(hugepages.describe())
  if jax.process_count() > 1 and FLAGS.mode not in ('train', 'evaluate'):
    raise app.UsageError(f'--mode={FLAGS.mode} runs in one process; '
                         'several processes train and evaluate')
  if 'ablate' in FLAGS.config and FLAGS.mode != 'ablate':
    raise app.UsageError('this is an ablation config: run it with '
                         '--mode=ablate')
  if FLAGS.mode == 'train':
    from fer_jax import training
    training.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  elif FLAGS.mode == 'evaluate':
    from fer_jax import evaluation
    evaluation.evaluate(FLAGS.config, FLAGS.workdir, FLAGS.split,
                        FLAGS.checkpoint_step, data_overrides())
  elif FLAGS.mode == 'predict':
    if not FLAGS.input:
      raise app.UsageError('--mode=predict needs --input=PATH')
    _note_unread_data()
    from fer_jax import predict
    predict.predict(FLAGS.config, FLAGS.workdir, FLAGS.input,
                    FLAGS.checkpoint_step)
  elif FLAGS.mode == 'export':
    _note_unread_data()
    from fer_jax import export
    export.export(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint_step)
  elif FLAGS.mode == 'import':
    from fer_jax import import_model
    import_model.import_model(FLAGS.config, FLAGS.workdir)
  elif FLAGS.mode == 'benchmark':
    if 'benchmark' not in FLAGS.config:
      raise app.UsageError('--mode=benchmark needs a config with a benchmark '
                           'section: --config=configs/benchmark.py')
    from fer_jax import benchmark
    benchmark.run(FLAGS.config, FLAGS.workdir)


def run_ablation() -> None:
  """--mode=ablate. Its runs use the devices, each in a process of its
  own: this one starts no JAX backend (on a GPU or TPU it would hold the
  devices they need), and it runs once, not once per process."""
  from fer_jax import distributed
  if 'ablate' not in FLAGS.config:
    raise app.UsageError('--mode=ablate needs an ablation config: '
                         '--config=configs/ablations/imbalance.py')
  if (FLAGS.coordinator_address or (FLAGS.num_processes or 1) > 1 or (
      FLAGS.num_processes is None and
      distributed.cluster_environment() in ('SLURM', 'Open MPI'))):
    raise app.UsageError('--mode=ablate runs in one process (its runs may '
                         'not); several processes train and evaluate')
  filename = config_flags.get_config_filename(FLAGS['config'])
  workdir = FLAGS.workdir if FLAGS['workdir'].present else os.path.join(
      'runs', 'ablations', os.path.splitext(os.path.basename(
          filename.partition(':')[0]))[0])
  import signal
  from fer_jax import ablate, ablate_tasks

  def stop(signum, frame):  # scancel, a job's time limit, GNU parallel
    raise SystemExit(128 + signum)  # as Ctrl-C: its runs stop, locks go
  signal.signal(signal.SIGTERM, stop)
  ablate.run(FLAGS.config, workdir, ablate_tasks.config_flags(
      filename, config_flags.get_override_values(FLAGS['config'])))


def run() -> None:
  """The command's entry point (fer-jax, main.py)."""
  hugepages.restart_with_huge_pages()  # first: glibc reads it at a start
  define_flags()
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
