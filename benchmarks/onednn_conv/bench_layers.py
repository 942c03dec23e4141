"""Times each ResNet18 convolution, forward + backward: XLA, oneDNN, torch.

value_and_grad wrt x and w of sum(conv(x, w) * constant), batch 32,
float32, one process; the implementations take turns in each round, so
machine noise hits them alike. oneDNN twice: weights in HWIO as given
(dnnl_hwio) and in the layout oneDNN picks (dnnl_any). torch eager,
channels_last, when torch is importable. Prints each layer's median and the
totals weighted by how often ResNet18 has the layer.

  DNNL_CONV_LIB=$BUILD/libdnnl_conv.so \\
      python bench_layers.py --image_sizes 72 112 [--json out.json]
"""

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import dnnl_conv
from bench_resnet import times_ms

try:
  import torch
except ImportError:
  torch = None

BATCH = 32


def halve(size: int) -> int:
  """Output size of a 3x3 (or 1x1 unpadded) stride-2 layer."""
  return (size - 1) // 2 + 1


def layers(px: int) -> list[tuple]:
  """(name, H_in, C_in, C_out, kernel, stride, padding, count in ResNet18)."""
  a = halve(halve(px))  # after the 7x7 stride-2 stem and the max pool
  b, c, d = halve(a), halve(halve(a)), halve(halve(halve(a)))
  return [('stem 7x7s2 3->64', px, 3, 64, 7, 2, 3, 1),
          (f'3x3 64@{a}', a, 64, 64, 3, 1, 1, 4),
          (f'3x3s2 64->128 {a}->{b}', a, 64, 128, 3, 2, 1, 1),
          (f'3x3 128@{b}', b, 128, 128, 3, 1, 1, 3),
          (f'3x3s2 128->256 {b}->{c}', b, 128, 256, 3, 2, 1, 1),
          (f'3x3 256@{c}', c, 256, 256, 3, 1, 1, 3),
          (f'3x3s2 256->512 {c}->{d}', c, 256, 512, 3, 2, 1, 1),
          (f'3x3 512@{d}', d, 512, 512, 3, 1, 1, 3),
          (f'1x1s2 64->128 {a}->{b}', a, 64, 128, 1, 2, 0, 1),
          (f'1x1s2 128->256 {b}->{c}', b, 128, 256, 1, 2, 0, 1),
          (f'1x1s2 256->512 {c}->{d}', c, 256, 512, 1, 2, 0, 1)]


def jax_step(conv, x, w, cotangent):
  """A function that runs conv's forward + backward once."""
  loss = lambda x, w: jnp.sum(conv(x, w) * cotangent)
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  x, w = jnp.asarray(x), jnp.asarray(w)
  return lambda: jax.block_until_ready(step(x, w))


def torch_step(x, w, cotangent, stride, padding):
  """The same in torch eager, channels_last."""
  nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)
  x = nchw(x).contiguous(memory_format=torch.channels_last)
  w = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous(
      memory_format=torch.channels_last)
  x.requires_grad_(), w.requires_grad_()
  cotangent = nchw(cotangent)

  def run():
    x.grad = w.grad = None
    y = torch.nn.functional.conv2d(x, w, stride=stride, padding=padding)
    (y * cotangent).sum().backward()
  return run


def steps(h, c_in, c_out, k, s, p) -> dict:
  """The implementations' steps for one layer, by name."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((BATCH, h, h, c_in), np.float32)
  w = (rng.standard_normal((k, k, c_in, c_out))
       / np.sqrt(k * k * c_in)).astype(np.float32)
  out = (h + 2 * p - k) // s + 1
  cotangent = rng.standard_normal((BATCH, out, out, c_out), np.float32)
  convs = {'xla': lambda x, w: dnnl_conv.xla_conv(x, w, s, p),
           'dnnl_hwio': lambda x, w: dnnl_conv.conv(x, w, s, p, 0),
           'dnnl_any': lambda x, w: dnnl_conv.conv(x, w, s, p, 1)}
  fns = {name: jax_step(conv, x, w, cotangent) for name, conv in convs.items()}
  if torch is not None:
    fns['torch'] = torch_step(x, w, cotangent, s, p)
  return fns


def median_ms(fns: dict, rounds: int, iters: int) -> dict:
  """Median over rounds of each function's mean time, in turns."""
  return {name: float(np.median(t))
          for name, t in times_ms(fns, rounds, iters).items()}


def bench(px: int, rounds: int, iters: int) -> dict:
  """Per-layer medians and weighted totals at one image size."""
  rows = []
  for name, h, c_in, c_out, k, s, p, count in layers(px):
    ms = median_ms(steps(h, c_in, c_out, k, s, p), rounds, iters)
    rows.append((name, count, ms))
    print(f'{px}px {name:26s} x{count} '
          + ' '.join(f'{n} {v:7.2f}' for n, v in ms.items()), flush=True)
  total = {n: sum(count * ms[n] for _, count, ms in rows) for n in rows[0][2]}
  print(f'{px}px weighted total (ms): '
        + ' '.join(f'{n} {v:.1f}' for n, v in total.items()))
  print(f'{px}px speed-up over xla: '
        + ' '.join(f'{n} {total["xla"] / v:.2f}x' for n, v in total.items()))
  if 'torch' in total:
    print(f'{px}px speed relative to torch (torch ms / ms): '
          + ' '.join(f'{n} {total["torch"] / v:.2f}'
                     for n, v in total.items()))
  return {'layers': rows, 'total_ms': total}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--image_sizes', type=int, nargs='+', default=[72, 112])
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--iters', type=int, default=3)
  parser.add_argument('--json', help='also write the results here')
  args = parser.parse_args()
  if torch is not None:  # as many threads as oneDNN's OpenMP takes
    torch.set_num_threads(os.cpu_count())
  print(f'oneDNN {dnnl_conv.VERSION}, torch '
        f'{torch.__version__ if torch else "not installed"}')
  results = {px: bench(px, args.rounds, args.iters) for px in args.image_sizes}
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
