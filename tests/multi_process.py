"""One process of a run on several, for tests/test_distributed.py:

  python tests/multi_process.py MODE WORKDIR CACHE_DIR PROCESS_ID
      NUM_PROCESSES LOCAL_DEVICES PORT

MODE 'train' trains the tiny config (2 epochs of 9 steps, a checkpoint every
4 steps) and writes every step's loss, as this process saw it, to
WORKDIR/../losses_PROCESS_ID.json; 'evaluate' evaluates WORKDIR's best
checkpoint on the test split. LOCAL_DEVICES simulated CPU devices; the
processes meet at localhost:PORT.

The backbone stays frozen (only the heads learn): see test_distributed.py
for why a whole-network run cannot be compared step by step.
"""

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


def main(mode, workdir, cache_dir, process_id, num_processes, devices, port):
  os.environ['XLA_FLAGS'] = (
      f'--xla_force_host_platform_device_count={devices}')
  os.environ['JAX_PLATFORMS'] = 'cpu'
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  from fer_jax import distributed, evaluate, steps, train
  from tests.conftest import tiny_config
  if int(num_processes) > 1:
    distributed.initialize(f'localhost:{port}', int(num_processes),
                           int(process_id))
  config = tiny_config(Path(cache_dir))
  config.train.checkpoint_every_steps = 4
  config.train.keep_checkpoints = 5
  config.train.freeze_backbone_epochs = config.train.num_epochs
  if mode == 'evaluate':
    evaluate.evaluate(config, workdir, 'test')
    return
  losses = []
  record_losses(steps, losses)
  train.train_and_evaluate(config, workdir)
  Path(workdir).parent.joinpath(f'losses_{process_id}.json').write_text(
      json.dumps(losses))


if __name__ == '__main__':
  main(*sys.argv[1:])
