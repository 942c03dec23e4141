"""A 3x3 convolution's kernel gradient on this backend: XLA's against
layers.conv_matmul_grad's (per-tap matmuls over chunks of the batch).

  python -m benchmarks.conv_kernel_grad
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from fer_jax.models import layers

SHAPES = ((32, 28, 28, 64), (32, 14, 14, 128), (32, 18, 18, 64),
          (32, 7, 7, 256))


def best_ms(fn, *args, repeats: int = 5, rounds: int = 3) -> float:
  """The best over rounds of the median of repeats calls, in ms."""
  jax.block_until_ready(fn(*args))
  medians = []
  for _ in range(rounds):
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - start)
    medians.append(np.median(times))
  return min(medians) * 1e3


def main():
  rng = np.random.default_rng(0)
  print(f'{"input (NHWC)":>16} {"forward ms":>10} {"XLA dW ms":>10} '
        f'{"matmul dW ms":>12}')
  for shape in SHAPES:
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, shape[-1], shape[-1])) * 0.05,
                    jnp.float32)
    dy = jnp.asarray(rng.normal(size=shape), jnp.float32)
    xla = lambda x, w: layers._conv(x, w, 1, 1)
    ours = lambda x, w: layers.conv_matmul_grad(x, w, 1, 1)
    kernel_grad = lambda conv: jax.jit(jax.grad(
        lambda w, x: jnp.vdot(conv(x, w), dy)))
    print(f'{"x".join(map(str, shape)):>16} '
          f'{best_ms(jax.jit(xla), x, w):>10.1f} '
          f'{best_ms(kernel_grad(xla), w, x):>10.1f} '
          f'{best_ms(kernel_grad(ours), w, x):>12.1f}')


if __name__ == '__main__':
  main()
