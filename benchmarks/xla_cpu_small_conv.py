"""Times a 3x3 convolution (forward and forward+backward) by input size.

XLA:CPU is far slower on a 2x2 feature map than on 3x3, which is why the
default config trains at 72 px (ResNet18's last stage 3x3), not 64 (2x2).

  python -m benchmarks.xla_cpu_small_conv
"""

import time

import jax
import jax.numpy as jnp


def conv(x, w, stride):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                      dimension_numbers=('NHWC', 'HWIO',
                                                         'NHWC'))


def median_ms(fn, *args, repeats=5):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2] * 1e3


def main():
  print(f'{"input":>14} {"stride":>6} {"forward ms":>11} {"fwd+bwd ms":>11}')
  for hw, channels, stride in ((2, 512, 1), (3, 512, 1), (4, 256, 2),
                               (5, 256, 2), (4, 256, 1)):
    x = jnp.ones((64, hw, hw, channels))
    w = jnp.full((3, 3, channels, channels), 0.01)
    loss = lambda x, w: jnp.sum(conv(x, w, stride) ** 2)
    forward = jax.jit(loss)
    backward = jax.jit(jax.grad(loss, argnums=(0, 1)))
    print(f'{f"64x{hw}x{hw}x{channels}":>14} {stride:>6} '
          f'{median_ms(forward, x, w):>11.1f} {median_ms(backward, x, w):>11.1f}')


if __name__ == '__main__':
  main()
