"""Times a whole ResNet18 train step with each convolution, and torch's.

Forward, backward and SGD with Nesterov momentum, BatchNorm in training
mode, batch 32, float32, 8 classes; jitted. The implementations take turns
in each round, in one process:
  xla       lax.conv_general_dilated
  dnnl      dnnl_conv.conv (oneDNN)
  dnnl_ser  the same, with oneDNN calls run one at a time (a mutex)
  proj      fer_jax's CpuConv (fer_jax.models.layers), from this repository
  noconv    a cheap stand-in with the conv's output shape: the rest of the step
  torch     torchvision's resnet18 in eager mode, channels_last
With torch in the list, each is also given as torch's time / its time.

  DNNL_CONV_LIB=$BUILD/libdnnl_conv.so \\
      python bench_resnet.py --image_sizes 72 112 --impls xla dnnl torch
"""

import argparse
import os
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import dnnl_conv

sys.path.append(str(Path(__file__).resolve().parents[2]))  # for fer_jax

BATCH = 32
CLASSES = 8
IMPLS = ('xla', 'dnnl', 'dnnl_ser', 'proj', 'noconv', 'torch')


class Conv(nn.Module):
  """A bias-free convolution by the chosen implementation."""
  features: int
  k: int
  s: int = 1
  p: int = 0
  impl: str = 'xla'

  @nn.compact
  def __call__(self, x):
    if self.impl == 'proj':
      from fer_jax.models.layers import CpuConv
      return CpuConv(self.features, self.k, self.s, self.p)(x)
    init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
    w = self.param('kernel', init, (self.k, self.k, x.shape[-1],
                                    self.features))
    if self.impl == 'xla':
      return dnnl_conv.xla_conv(x, w, self.s, self.p)
    if self.impl == 'noconv':
      return x[:, ::self.s, ::self.s, :1] * w[0, 0, 0, :]
    return dnnl_conv.conv(x, w, self.s, self.p)


def batch_norm(train):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5)


class Block(nn.Module):
  """ResNet's basic block."""
  features: int
  s: int
  impl: str

  @nn.compact
  def __call__(self, x, train):
    y = Conv(self.features, 3, self.s, 1, self.impl)(x)
    y = nn.relu(batch_norm(train)(y))
    y = batch_norm(train)(Conv(self.features, 3, 1, 1, self.impl)(y))
    if self.s != 1 or x.shape[-1] != self.features:
      x = batch_norm(train)(Conv(self.features, 1, self.s, 0, self.impl)(x))
    return nn.relu(x + y)


class ResNet18(nn.Module):
  impl: str = 'xla'

  @nn.compact
  def __call__(self, x, train=True):
    x = Conv(64, 7, 2, 3, self.impl)(x)
    x = nn.relu(batch_norm(train)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, features in enumerate((64, 128, 256, 512)):
      x = Block(features, 1 if i == 0 else 2, self.impl)(x, train)
      x = Block(features, 1, self.impl)(x, train)
    return nn.Dense(CLASSES)(jnp.mean(x, axis=(1, 2)))


def jax_step(impl: str, px: int):
  """A function that runs one jitted train step with impl's convolution."""
  if impl == 'dnnl_ser':
    return serialized(jax_step('dnnl', px))
  model = ResNet18(impl)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((BATCH, px, px, 3), np.float32))
  labels = jnp.asarray(rng.integers(0, CLASSES, BATCH))
  variables = model.init(jax.random.PRNGKey(0), x)
  tx = optax.sgd(0.01, momentum=0.9, nesterov=True)
  state = [variables['params'], variables['batch_stats'],
           tx.init(variables['params'])]

  @jax.jit
  def step(params, batch_stats, opt_state, x, labels):
    def loss_fn(params):
      logits, updates = model.apply(
          {'params': params, 'batch_stats': batch_stats}, x,
          mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return loss.mean(), updates['batch_stats']
    (_, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state

  def run():
    state[:] = jax.block_until_ready(step(*state, x, labels))
  return run


def serialized(run):
  """run with the library's calls one at a time."""
  def run_serialized():
    dnnl_conv.LIB.dnnl_conv_set_serialize(1)
    try:
      run()
    finally:
      dnnl_conv.LIB.dnnl_conv_set_serialize(0)
  return run_serialized


def torch_step(px: int):
  """One eager train step of torchvision's resnet18, channels_last."""
  import torch
  import torchvision
  torch.set_num_threads(os.cpu_count())  # as many as oneDNN's OpenMP
  model = torchvision.models.resnet18(num_classes=CLASSES)
  model = model.to(memory_format=torch.channels_last).train()
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                        nesterov=True)
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.standard_normal((BATCH, 3, px, px), np.float32))
  x = x.contiguous(memory_format=torch.channels_last)
  labels = torch.from_numpy(rng.integers(0, CLASSES, BATCH))

  def run():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), labels).backward()
    opt.step()
  return run


def times_ms(fns: dict, rounds: int, iters: int) -> dict:
  """Each function's mean time per round, in turns."""
  for fn in fns.values():
    fn(), fn()  # compile, warm up
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      for _ in range(iters):
        fn()
      times[name].append((time.perf_counter() - start) / iters * 1e3)
  return {name: np.array(t) for name, t in times.items()}


def report(px: int, times: dict, rounds: int, iters: int):
  """Medians; with torch, the median [min..max] of per-round torch / impl."""
  line = ' '.join(f'{n} {np.median(t):.0f}ms' for n, t in times.items())
  if 'torch' in times:
    ratios = {n: times['torch'] / t for n, t in times.items() if n != 'torch'}
    line += ' | vs torch: ' + ' '.join(
        f'{n} {np.median(r):.2f}x [{r.min():.2f}..{r.max():.2f}]'
        for n, r in ratios.items())
  print(f'ResNet18 train step B{BATCH} {px}px (median of {rounds} rounds x '
        f'{iters}): {line}', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--image_sizes', type=int, nargs='+', default=[72, 112])
  parser.add_argument('--impls', nargs='+', choices=IMPLS,
                      default=['xla', 'dnnl', 'torch'])
  parser.add_argument('--rounds', type=int, default=6)
  parser.add_argument('--iters', type=int, default=3)
  args = parser.parse_args()
  print(f'oneDNN {dnnl_conv.VERSION}; OMP_NUM_THREADS '
        f'{os.environ.get("OMP_NUM_THREADS")}; XLA_FLAGS '
        f'{os.environ.get("XLA_FLAGS")}')
  for px in args.image_sizes:
    fns = {impl: torch_step(px) if impl == 'torch' else jax_step(impl, px)
           for impl in args.impls}
    report(px, times_ms(fns, args.rounds, args.iters), args.rounds,
           args.iters)
  if dnnl_conv.AVAILABLE:
    print('most dnnl_conv calls at once:',
          dnnl_conv.LIB.dnnl_conv_max_concurrent(), '; cached primitives:',
          dnnl_conv.LIB.dnnl_conv_cache_size())


if __name__ == '__main__':
  main()
