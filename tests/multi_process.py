"""One process of a tiny training run on several, for test_distributed.py:

  python tests/multi_process.py WORKDIR CACHE_DIR PROCESS_ID NUM_PROCESSES PORT
      [NUM_WORKERS]

Trains the tiny config (2 epochs of 9 steps, a checkpoint every 4 steps)
on the CPU devices XLA_FLAGS gives it, with NUM_WORKERS Grain worker
processes (default 0), meeting the other processes at localhost:PORT, and
writes every step's loss, as this process saw it, to
WORKDIR/../losses_PROCESS_ID.json. With FAIL_WRITING=NAME in its
environment, process 0 fails to write any JSON file called NAME. The backbone stays frozen (only the
heads learn): test_distributed.py says why.
"""

import errno
import json
import os
import sys
from pathlib import Path


def record_losses(steps, losses: list) -> None:
  """Makes steps.pmap_steps's train step append each step's loss."""
  pmap_steps = steps.pmap_steps

  def recording(*args, **kwargs):
    p_train, p_eval = pmap_steps(*args, **kwargs)

    def p_train_recorded(state, batch):
      state, metrics = p_train(state, batch)
      losses.append(float(steps.unreplicate(metrics)['loss']))
      return state, metrics
    return p_train_recorded, p_eval
  steps.pmap_steps = recording


def tiny_run_config(cache_dir: Path):
  from tests.conftest import tiny_config
  config = tiny_config(cache_dir)
  config.train.checkpoint_every_steps = 4
  config.train.keep_checkpoints = 5
  config.train.freeze_backbone_epochs = config.train.num_epochs
  return config


def fail_writing(files, name: str) -> None:
  """Makes files.write_json fail on a file called name, as a full disk."""
  write_json = files.write_json

  def failing(path, value):
    if Path(path).name == name:
      raise OSError(errno.ENOSPC, 'No space left on device', str(path))
    write_json(path, value)
  files.write_json = failing


def main(workdir, cache_dir, process_id, num_processes, port, num_workers=0):
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  from fer_jax import distributed, files, steps, training
  if os.environ.get('FAIL_WRITING') and process_id == '0':
    fail_writing(files, os.environ['FAIL_WRITING'])
  if int(num_processes) > 1:
    distributed.initialize(f'localhost:{port}', int(num_processes),
                           int(process_id))
  losses = []
  record_losses(steps, losses)
  config = tiny_run_config(Path(cache_dir))
  config.data.num_workers = int(num_workers)
  training.train_and_evaluate(config, workdir)
  Path(workdir).parent.joinpath(f'losses_{process_id}.json').write_text(
      json.dumps(losses))


if __name__ == '__main__':  # python -m tests.multi_process, from the root
  main(*sys.argv[1:])
