"""fer_jax's train step against PyTorch's, side by side, with ratios.

Each configuration (model x dtype x image size x batch) runs as child
processes that alternate, JAX then PyTorch, for --rounds rounds, so slow
drifts of a shared machine hit both alike; each side's fastest median over
the rounds is kept. Both run with the memory pages that main.py gives
itself (docs/performance.md: memory pages). Prints one line per
configuration with JAX img/s over PyTorch's (eager and compiled) and
writes compare.json to --out.

  python benchmarks/compare.py                      # CPU: 32 x 112 px, float32
  python benchmarks/compare.py --image_sizes 224 --batch_sizes 256 \\
      --dtypes float32 bfloat16 --torch_modes compile  # a GPU
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from fer_jax import hugepages  # noqa: E402
from fer_jax.benchmark import format_table  # noqa: E402


def child_environment() -> dict:
  """Both sides run with the memory pages main.py gives itself
  (fer_jax/hugepages.py), so that PyTorch has them too."""
  environ = dict(os.environ)
  return hugepages.restart_environment_here(environ) or environ


def jax_command(model: str, batch_size: int, image_size: int, dtype: str,
                steps: int, workdir: str, extra: list[str]) -> list[str]:
  return [sys.executable, os.path.join(ROOT, 'main.py'),
          '--config=' + os.path.join(ROOT, 'configs', 'benchmark.py'),
          '--mode=benchmark', f'--workdir={workdir}',
          f'--config.benchmark.models={model}',
          f'--config.benchmark.batch_sizes={batch_size}',
          f'--config.benchmark.image_sizes={image_size}',
          f'--config.benchmark.dtypes={dtype}',
          f'--config.benchmark.steps={steps}',
          '--config.benchmark.pipeline=False', *extra]


def torch_command(model: str, batch_size: int, image_size: int, dtype: str,
                  steps: int, modes: list[str], path: str,
                  device: str | None) -> list[str]:
  return [sys.executable, '-m', 'benchmarks.torch_reference',
          '--models', model, '--batch_sizes', str(batch_size),
          '--image_sizes', str(image_size), '--dtypes', dtype,
          '--steps', str(steps), '--modes', *modes, '--json', path,
          *(['--device', device] if device else [])]


def run_child(command: list[str], path: str, timeout: int) -> list[dict]:
  """The rows a child wrote to path; an error row if it failed."""
  try:
    result = subprocess.run(command, cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout,
                            env=child_environment())
    if result.returncode == 0 and os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    error = (result.stderr or result.stdout).strip().splitlines()[-3:]
  except subprocess.TimeoutExpired:
    error = [f'timed out after {timeout} s']
  print(f'  failed: {" ".join(command[1:4])}...: {" | ".join(error)}',
        file=sys.stderr, flush=True)
  return [{'error': ' | '.join(error)}]


def fastest(rows: list[dict]) -> dict | None:
  ok = [r for r in rows if 'images_per_sec' in r]
  return max(ok, key=lambda r: r['images_per_sec']) if ok else None


def ratio(a: dict | None, b: dict | None) -> float | None:
  return a['images_per_sec'] / b['images_per_sec'] if a and b else None


def format_ratios(results: list[dict], modes: list[str]) -> str:
  cols = ''.join(f'{"torch " + m:>15}{"ratio":>7}' for m in modes)
  lines = [f'{"model":>15} {"dtype":>8} {"batch":>5} {"px":>4} '
           f'{"jax img/s":>10}{cols}']
  for r in results:
    cells = ''
    for m in modes:
      t, q = r['torch'].get(m), r['ratio'].get(m)
      cells += (f'{t["images_per_sec"]:>15.1f}' if t else f'{"-":>15}')
      cells += f'{q:>7.2f}' if q else f'{"-":>7}'
    jax_ips = (f'{r["jax"]["images_per_sec"]:>10.1f}' if r['jax']
               else f'{"-":>10}')
    lines.append(f'{r["model"]:>15} {r["dtype"]:>8} {r["batch_size"]:>5} '
                 f'{r["image_size"]:>4} {jax_ips}{cells}')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', nargs='+',
                      default=['resnet18', 'efficientnet_b0'])
  parser.add_argument('--batch_sizes', nargs='+', type=int, default=[32])
  parser.add_argument('--image_sizes', nargs='+', type=int, default=[112])
  parser.add_argument('--dtypes', nargs='+', default=['float32'])
  parser.add_argument('--torch_modes', nargs='+', default=['eager'],
                      choices=['eager', 'compile'])
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--timeout', type=int, default=900,
                      help='seconds per child process')
  parser.add_argument('--out', default=os.path.join(ROOT, 'runs', 'compare'))
  parser.add_argument('--torch_device', help='cuda or cpu; default: cuda '
                      'where there is one')
  parser.add_argument('--summarise', metavar='DIR',
                      help='only print the tables of DIR/compare.json and '
                      'DIR/*/benchmark.json')
  parser.add_argument('--pair', nargs=2, metavar=('JAX_JSON', 'TORCH_JSON'),
                      help='no runs: the ratios of two files of rows, '
                      'written to --out/compare.json and printed')
  parser.add_argument('--jax_flags', nargs='*', default=[],
                      help='more main.py flags, e.g. '
                      '--config.model.kernels=library')
  args = parser.parse_args()
  if args.pair:
    os.makedirs(args.out, exist_ok=True)
    pair(*args.pair, args.out)
    args.summarise = args.out
  if args.summarise:
    summarise(args.summarise)
    return
  os.makedirs(args.out, exist_ok=True)
  results = []
  for dtype, model, size, batch in itertools.product(
      args.dtypes, args.models, args.image_sizes, args.batch_sizes):
    jax_rows, torch_rows = [], []
    for k in range(args.rounds):
      with tempfile.TemporaryDirectory() as tmp:
        jax_rows += run_child(
            jax_command(model, batch, size, dtype, args.steps, tmp,
                        args.jax_flags),
            os.path.join(tmp, 'benchmark.json'), args.timeout)
        path = os.path.join(tmp, 'torch.json')
        torch_rows += run_child(
            torch_command(model, batch, size, dtype, args.steps,
                          args.torch_modes, path, args.torch_device), path,
            args.timeout)
    results.append(combine((model, dtype, size, batch), jax_rows, torch_rows,
                           args.torch_modes, args.rounds))
    print(format_ratios(results[-1:], args.torch_modes).splitlines()[-1],
          flush=True)
    with open(os.path.join(args.out, 'compare.json'), 'w') as f:
      json.dump(results, f, indent=1)  # after each, in case time runs out
  print_tables(results)


def combine(key: tuple, jax_rows: list[dict], torch_rows: list[dict],
            modes: list[str], rounds: int) -> dict:
  """One configuration's fastest JAX and PyTorch rows and their ratios."""
  best_jax = fastest(jax_rows)
  best_torch = {m: fastest([r for r in torch_rows if r.get('mode') == m])
                for m in modes}
  model, dtype, size, batch = key
  return {'model': model, 'dtype': dtype, 'image_size': size,
          'batch_size': batch, 'rounds': rounds, 'jax': best_jax,
          'torch': best_torch,
          'ratio': {m: ratio(best_jax, t) for m, t in best_torch.items()},
          'all_rows': jax_rows + torch_rows}


def pair(jax_path: str, torch_path: str, out: str) -> None:
  """Ratios of rows measured by two separate runs (gpu_check.sh)."""
  rows = []
  for path in (jax_path, torch_path):
    if os.path.exists(path):
      with open(path) as f:
        rows += json.load(f)
  config_of = lambda r: (r['model'], r['dtype'], r['image_size'],
                         r['batch_size'])
  keys = sorted({config_of(r) for r in rows if 'images_per_sec' in r},
                key=lambda k: (k[1], k[0], k[2], k[3]))
  modes = sorted({r['mode'] for r in rows if r.get('framework') == 'torch'})
  results = [combine(
      key, [r for r in rows if r.get('framework') == 'jax'
            and config_of(r) == key],
      [r for r in rows if r.get('framework') == 'torch'
       and 'images_per_sec' in r and config_of(r) == key], modes, 1)
             for key in keys]
  with open(os.path.join(out, 'compare.json'), 'w') as f:
    json.dump(results, f, indent=1)


def print_tables(results: list[dict], extra_rows: tuple = ()) -> None:
  """Every row of every run, then the JAX / PyTorch ratios."""
  rows = [r for result in results for r in result['all_rows']
          if 'images_per_sec' in r] + list(extra_rows)
  print('\n' + format_table(rows))
  modes = sorted({m for r in results for m in r['torch']})
  device = next((r['jax']['device_kind'] for r in results if r['jax']), '?')
  rounds = results[0]['rounds'] if results else 0
  print(f'\nJAX / PyTorch images per second, {device}, best median of '
        f'{rounds} round(s):')
  print(format_ratios(results, modes))


def summarise(directory: str) -> None:
  with open(os.path.join(directory, 'compare.json')) as f:
    results = json.load(f)
  extra = []
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name, 'benchmark.json')
    if os.path.exists(path):
      with open(path) as f:
        extra += json.load(f)
  listed = [r for result in results for r in result['all_rows']]
  print_tables(results, [r for r in extra if r not in listed])


if __name__ == '__main__':
  main()
