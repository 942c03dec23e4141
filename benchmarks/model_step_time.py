"""Forward (eval step) and train-step time of the project's pmapped steps.

Times fer_jax's own steps (normalisation, model, losses, optimiser) on
device-resident random uint8 batches: warm-up, then the median of N steps.

  python -m benchmarks.model_step_time [--models resnet18 efficientnet_b0]
      [--batch 32] [--image_size 112] [--steps 10]
"""

import argparse
import time

import jax
import numpy as np

from configs import default
from fer_jax import models, steps


def median_seconds(fn, steps_count: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(steps_count):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def time_model(name: str, batch_size: int, image_size: int,
               steps_count: int) -> dict:
  """Compile and median step times of one model."""
  config = default.get_config()
  config.model.name = name
  config.data.image_size = image_size
  config.train.batch_size = batch_size
  devices = jax.local_device_count()
  model = models.create_model(config.model, axis_name=steps.AXIS)
  tx = steps.create_optimizer(config.train, lambda step: 1e-3)
  state = steps.replicate(steps.create_train_state(model, tx, image_size, 0))
  p_train, p_eval = steps.pmap_steps(model, tx, config)
  rng = np.random.default_rng(0)
  n = batch_size // devices
  batch = {
      'image': rng.integers(0, 256, (devices, n, image_size, image_size, 3),
                            dtype=np.uint8),
      'label': rng.integers(0, 8, (devices, n)).astype(np.int32),
      'va': rng.uniform(-1, 1, (devices, n, 2)).astype(np.float32),
      'va_mask': np.ones((devices, n), bool),
      'mask': np.ones((devices, n), bool)}
  batch = jax.pmap(lambda x: x)(batch)  # sharded on the devices once
  start = time.perf_counter()
  jax.block_until_ready(p_eval(state, batch))
  compile_eval = time.perf_counter() - start
  forward = median_seconds(lambda: p_eval(state, batch), steps_count)
  holder = {'state': state}

  def train():
    holder['state'], metrics = p_train(holder['state'], batch)
    return metrics

  start = time.perf_counter()
  jax.block_until_ready(train())
  compile_train = time.perf_counter() - start
  step = median_seconds(train, steps_count)
  return {'model': name, 'batch_size': batch_size, 'image_size': image_size,
          'compile_train_s': compile_train, 'compile_eval_s': compile_eval,
          'forward_ms': forward * 1e3, 'train_step_ms': step * 1e3,
          'train_images_per_sec': batch_size / step}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--models', nargs='+',
                      default=['resnet18', 'efficientnet_b0'])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--image_size', type=int, default=112)
  parser.add_argument('--steps', type=int, default=10)
  args = parser.parse_args()
  print(f'{jax.local_device_count()} x {jax.devices()[0].device_kind}, '
        f'batch {args.batch}, {args.image_size} px, float32')
  print(f'{"model":>16} {"compile s":>10} {"forward ms":>10} '
        f'{"train ms":>9} {"train img/s":>11}')
  for name in args.models:
    r = time_model(name, args.batch, args.image_size, args.steps)
    print(f"{name:>16} {r['compile_train_s']:>10.1f} {r['forward_ms']:>10.1f}"
          f" {r['train_step_ms']:>9.1f} {r['train_images_per_sec']:>11.1f}")


if __name__ == '__main__':
  main()
