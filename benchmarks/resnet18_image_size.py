"""ResNet18 train-step throughput by input size on this machine's backend.

Shows why configs/default.py trains at 72 px: XLA:CPU is slow on 2x2 feature
maps, which ResNet18's last stage has at 48-64 px inputs.

  python -m benchmarks.resnet18_image_size [--sizes 48 64 72 96] [--batch 32]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import optax

from fer_jax.models.resnet import ResNet18


def images_per_sec(size: int, batch: int, steps: int = 8) -> tuple[float, float]:
  """(compile seconds, images/s) of a jitted SGD step on the backbone."""
  model = ResNet18()
  x = jnp.ones((batch, size, size, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  tx = optax.sgd(0.1, 0.9)

  def loss_fn(params, batch_stats):
    features, updates = model.apply(
        {'params': params, 'batch_stats': batch_stats}, x, train=True,
        mutable=['batch_stats'])
    return jnp.mean(features ** 2), updates['batch_stats']

  @jax.jit
  def step(params, opt_state, batch_stats):
    grads, batch_stats = jax.grad(loss_fn, has_aux=True)(params, batch_stats)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, batch_stats

  state = (variables['params'], tx.init(variables['params']),
           variables['batch_stats'])
  start = time.perf_counter()
  state = jax.block_until_ready(step(*state))
  compile_s = time.perf_counter() - start
  state = jax.block_until_ready(step(*state))
  start = time.perf_counter()
  for _ in range(steps):
    state = step(*state)
  jax.block_until_ready(state)
  return compile_s, steps * batch / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--sizes', type=int, nargs='+', default=[48, 64, 72, 96])
  parser.add_argument('--batch', type=int, default=32)
  args = parser.parse_args()
  print(f'{jax.devices()[0].device_kind}, batch {args.batch}')
  print(f'{"size":>5} {"last stage":>10} {"compile s":>9} {"img/s":>7}')
  for size in args.sizes:
    last = -(-size // 32)  # stride 32 overall, 'SAME'-like rounding up
    compile_s, rate = images_per_sec(size, args.batch)
    print(f'{size:>5} {f"{last}x{last}":>10} {compile_s:>9.1f} {rate:>7.1f}')


if __name__ == '__main__':
  main()
