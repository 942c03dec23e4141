"""The benchmark's train step in PyTorch: torchvision models, same work.

What fer_jax's --mode=benchmark times, as a PyTorch user would write it:
torchvision's ResNet18 or EfficientNet-B0 with a 10-output head (8 logits,
2 tanh valence/arousal), uint8 NHWC images normalised on the device,
channels_last, cross-entropy + MSE, SGD with Nesterov momentum and weight
decay on weights only, BatchNorm in training mode. 'eager' runs it as is;
'compile' wraps the model in torch.compile. bfloat16 is autocast with
float32 parameters, as model.dtype='bfloat16' does in fer_jax. float32
allows TF32 on GPUs, as XLA does by default. Rows match benchmark.json.

  python -m benchmarks.torch_reference --models resnet18 efficientnet_b0 \\
      --modes eager compile --batch_sizes 32 --image_sizes 112 --json out.json
"""

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
import torchvision

from fer_jax import hugepages
from fer_jax.benchmark import format_table

MEAN_RGB = (0.485, 0.456, 0.406)
STD_RGB = (0.229, 0.224, 0.225)


def make_model(name: str, device: torch.device) -> torch.nn.Module:
  net = getattr(torchvision.models, name)(num_classes=10)
  return net.to(device, memory_format=torch.channels_last).train()


def make_optimizer(net: torch.nn.Module, lr: float = 0.01,
                   weight_decay: float = 5e-4) -> torch.optim.Optimizer:
  """SGD as fer_jax's: no weight decay on biases and BatchNorm (1-D)."""
  decay = [p for p in net.parameters() if p.ndim > 1]
  no_decay = [p for p in net.parameters() if p.ndim <= 1]
  return torch.optim.SGD([{'params': decay, 'weight_decay': weight_decay},
                          {'params': no_decay, 'weight_decay': 0.0}],
                         lr=lr, momentum=0.9, nesterov=True)


def make_step(net, optimizer, device: torch.device, dtype: str):
  """One training step on a uint8 NHWC batch; returns the loss tensor."""
  mean = torch.tensor(MEAN_RGB, device=device).view(1, 3, 1, 1) * 255
  std = torch.tensor(STD_RGB, device=device).view(1, 3, 1, 1) * 255
  autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=dtype == 'bfloat16')

  def step(images, labels, va):
    x = images.permute(0, 3, 1, 2).float()  # NHWC memory: channels_last
    x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
    with autocast:
      out = net(x).float()
    loss = (torch.nn.functional.cross_entropy(out[:, :8], labels)
            + torch.nn.functional.mse_loss(torch.tanh(out[:, 8:]), va))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss

  return step


def synchronize(device: torch.device) -> None:
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


def benchmark_row(name: str, mode: str, batch_size: int, image_size: int,
                  dtype: str, device: torch.device, warmup: int,
                  steps: int) -> dict:
  """Compile (first step) time and the median of `steps` timed steps."""
  torch.manual_seed(0)
  net = make_model(name, device)
  if mode == 'compile':
    net = torch.compile(net)
  step = make_step(net, make_optimizer(net), device, dtype)
  rng = np.random.default_rng(0)
  images = torch.from_numpy(rng.integers(
      0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
                            ).to(device)
  labels = torch.from_numpy(rng.integers(0, 8, batch_size)).to(device)
  va = torch.from_numpy(rng.uniform(-1, 1, (batch_size, 2)).astype(
      np.float32)).to(device)
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)
  start = time.perf_counter()
  step(images, labels, va)
  synchronize(device)
  first_s = time.perf_counter() - start
  for _ in range(warmup):
    step(images, labels, va)
  synchronize(device)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    loss = step(images, labels, va)
    synchronize(device)
    times.append(time.perf_counter() - start)
  median = float(np.median(times))
  return {
      'framework': 'torch', 'mode': mode, 'model': name,
      'batch_size': batch_size, 'image_size': image_size, 'dtype': dtype,
      'num_devices': 1,
      'device_kind': (torch.cuda.get_device_name(device)
                      if device.type == 'cuda' else platform.processor()
                      or 'cpu'),
      'backend': device.type, 'torch': torch.__version__,
      'host': platform.node(),
      **hugepages.record(),
      'threads': torch.get_num_threads(),
      'compile_s': first_s - median if mode == 'compile' else None,
      'first_step_s': first_s,
      'step_ms_median': median * 1e3,
      'step_ms_p10': float(np.percentile(times, 10)) * 1e3,
      'step_ms_p90': float(np.percentile(times, 90)) * 1e3,
      'images_per_sec': batch_size / median,
      'images_per_sec_per_device': batch_size / median,
      'peak_memory_gb': (torch.cuda.max_memory_allocated(device) / 2**30
                         if device.type == 'cuda' else None),
      'loss_finite': bool(torch.isfinite(loss).item()),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', nargs='+',
                      default=['resnet18', 'efficientnet_b0'])
  parser.add_argument('--modes', nargs='+', default=['eager', 'compile'],
                      choices=['eager', 'compile'])
  parser.add_argument('--batch_sizes', nargs='+', type=int, default=[32])
  parser.add_argument('--image_sizes', nargs='+', type=int, default=[112])
  parser.add_argument('--dtypes', nargs='+', default=['float32'],
                      choices=['float32', 'bfloat16'])
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--device', default='cuda' if torch.cuda.is_available()
                      else 'cpu')
  parser.add_argument('--json', help='write the rows here')
  args = parser.parse_args()
  torch.backends.cudnn.benchmark = True
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  device = torch.device(args.device)
  rows = []
  for name in args.models:
    for dtype in args.dtypes:
      for image_size in args.image_sizes:
        for batch_size in args.batch_sizes:
          for mode in args.modes:
            try:
              row = benchmark_row(name, mode, batch_size, image_size, dtype,
                                  device, args.warmup, args.steps)
            except Exception as e:  # torch.compile fails on some set-ups
              row = {'framework': 'torch', 'mode': mode, 'model': name,
                     'batch_size': batch_size, 'image_size': image_size,
                     'dtype': dtype, 'error': f'{type(e).__name__}: {e}'}
              print(f'{name} {mode} {dtype}: {row["error"]}', flush=True)
            rows.append(row)
            print(format_table([row], header=len(rows) == 1), flush=True)
            if args.json:  # after each row, in case time runs out
              os.makedirs(os.path.dirname(os.path.abspath(args.json)),
                          exist_ok=True)
              with open(args.json, 'w') as f:
                json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
