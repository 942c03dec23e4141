"""Where fer_jax's train step spends its time: a jax.profiler trace, as tables.

For each model of `config.benchmark` (its first dtype, image size and batch
size): the pmapped train step of --mode=benchmark on device-resident random
batches, compiled, warmed up, then a few steps traced, each in a
StepTraceAnnotation and waited for. jax.profiler.trace writes
plugins/profile/<run>/<host>.trace.json.gz and <host>.xplane.pb
(create_perfetto_trace=True adds perfetto_trace.json.gz, the same JSON
without its metadata). `top_ops` reads the JSON: on a GPU the kernels of
the device's 'Stream #' lines (cuDNN/cuBLAS calls and XLA's fusions, each
with its hlo_op), on a CPU the XLA ops the host threads ran. Per step:
each op's total time, calls, and percent of the step's wall time (on a
CPU, ops of several threads overlap, so percentages can sum past 100).

  python -m benchmarks.gpu_rows profile --config=configs/benchmark.py \\
      --config.benchmark.dtypes=bfloat16 --config.benchmark.image_sizes=224 \\
      --config.benchmark.batch_sizes=256 --out=runs/profile.md
"""

import collections
import glob
import gzip
import json
import os
from typing import Iterator

import ml_collections

STEP = 'fer_jax_train_step'  # the StepTraceAnnotation's name


def top_ops(trace: dict, step_name: str = STEP, top: int = 15) -> dict:
  """The ops of a trace.json that take most time, per annotated step."""
  events = trace['traceEvents']
  names = {(e['name'], e['pid'], e.get('tid')): e['args']['name']
           for e in events if e.get('ph') == 'M'
           and e.get('name') in ('process_name', 'thread_name')}
  spans = [e for e in events if e.get('ph') == 'X']
  steps = [e['dur'] for e in spans if e['name'] == step_name]
  if not steps:
    raise ValueError(f'no {step_name!r} events in the trace')
  ops = [e for e in spans
         if names.get(('process_name', e['pid'], None), '').startswith(
             '/device:') and names.get(('thread_name', e['pid'], e.get(
                 'tid')), '').startswith('Stream #')]
  source = 'GPU kernels (device streams)'
  if not ops:
    ops = [e for e in spans if 'hlo_op' in e.get('args', {})]
    source = 'XLA ops (host threads)'
  total, calls, hlo = collections.Counter(), collections.Counter(), {}
  for e in ops:
    total[e['name']] += e['dur']
    calls[e['name']] += 1
    hlo.setdefault(e['name'], e.get('args', {}).get('hlo_op', ''))
  n, step_us = len(steps), sum(steps) / len(steps)
  return {
      'source': source, 'steps': n, 'step_ms': step_us / 1e3,
      'busy_ms': sum(total.values()) / n / 1e3,
      'busy_percent': 100 * sum(total.values()) / n / step_us,
      'ops': [{'name': name, 'hlo_op': hlo[name], 'calls': calls[name] / n,
               'ms': us / n / 1e3, 'percent': 100 * us / n / step_us}
              for name, us in total.most_common(top)]}


def format_markdown(title: str, summary: dict) -> str:
  """One model's table: op, its hlo_op, calls, ms and % per step."""
  lines = [f'## {title}', '',
           f"{summary['steps']} steps traced: {summary['step_ms']:.2f} ms per "
           f"step; {summary['source']} busy {summary['busy_ms']:.2f} ms "
           f"({summary['busy_percent']:.0f}% of the step).", '',
           '| # | op | hlo_op | calls/step | ms/step | % of step |',
           '|---:|---|---|---:|---:|---:|']
  for k, op in enumerate(summary['ops'], 1):
    name = op['name'] if len(op['name']) <= 90 else op['name'][:87] + '...'
    lines.append(f"| {k} | `{name}` | {op['hlo_op']} | {op['calls']:.0f} | "
                 f"{op['ms']:.3f} | {op['percent']:.1f} |")
  return '\n'.join(lines) + '\n'


def load_trace(trace_dir: str) -> dict:
  """The newest <host>.trace.json.gz that jax.profiler wrote in trace_dir."""
  paths = [p for p in glob.glob(os.path.join(
      trace_dir, 'plugins', 'profile', '*', '*.trace.json.gz'))
           if not p.endswith('perfetto_trace.json.gz')]
  if not paths:
    raise FileNotFoundError(f'no *.trace.json.gz under {trace_dir}')
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    return json.load(f)


def trace_step(config: ml_collections.ConfigDict, trace_dir: str,
               steps: int, top: int = 15) -> dict:
  """Traces `steps` train steps of config's first grid row; top_ops of it."""
  import jax
  from fer_jax import benchmark
  bench, devices = config.benchmark, jax.local_devices()
  compiled, state, batch, _, _ = benchmark.compiled_step(config, devices)
  for _ in range(bench.warmup_steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  with jax.profiler.trace(trace_dir):
    for k in range(steps):
      with jax.profiler.StepTraceAnnotation(STEP, step_num=k):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
  return top_ops(load_trace(trace_dir), STEP, top)


def profile(config: ml_collections.ConfigDict, trace_dir: str, steps: int,
            top: int, out: str) -> Iterator[dict]:
  """Traces each model of config.benchmark; writes the tables to out after
  each (in case time runs out) and yields its row."""
  import jax
  from fer_jax import benchmark
  bench = config.benchmark
  dtype, size, batch = (bench.dtypes[0], bench.image_sizes[0],
                        bench.batch_sizes[0])
  device = jax.local_devices()[0].device_kind
  text = (f'# Profile of the train step ({device}, JAX {jax.__version__})\n\n'
          'benchmarks/profile_step.py: the top ops by time per step.\n')
  for name in bench.models:
    row_config = benchmark.step_config(config, name, batch, size, dtype)
    summary = trace_step(row_config, os.path.join(trace_dir, name), steps,
                         top)
    table = format_markdown(f'{name} {dtype}, {size} px, batch {batch}',
                            summary)
    text += '\n' + table
    with open(out, 'w') as f:
      f.write(text)
    print(table, flush=True)
    yield {'part': 'profile', 'model': name, 'dtype': dtype,
           'image_size': size, 'batch_size': batch, 'device_kind': device,
           **{k: v for k, v in summary.items() if k != 'ops'},
           'top': [{**op, 'name': op['name'][:120]} for op in summary['ops']]}
