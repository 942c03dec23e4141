"""--mode=benchmark: the compiled train step, the input pipeline, and both.

For every model x batch size x image size x dtype of `config.benchmark`:
  step      the pmapped train step on device-resident random data: compile
            time, warm-up, then the median and spread of N timed steps, each
            ended with block_until_ready; FLOPs from XLA's cost analysis.
  pipeline  the Grain training pipeline alone (decode + augment + batch).
  fed       the step fed by the pipeline, so input-bound runs show.
Rows go to workdir/benchmark.json and a table is printed.
"""

import os
import platform
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from fer_jax import data, errors, files, hugepages, labels, models, steps
from fer_jax.data import pipeline
from fer_jax.models.layers import kernels_impl


def random_batch(batch_size: int, image_size: int, devices: list,
                 seed: int = 0) -> dict:
  """A random uint8 training batch, sharded over devices and resident there."""
  rng = np.random.default_rng(seed)
  d, n = len(devices), batch_size // len(devices)
  batch = {
      'image': rng.integers(0, 256, (d, n, image_size, image_size, 3),
                            dtype=np.uint8),
      'label': rng.integers(0, 2, (d, n)).astype(np.int32),  # any K >= 2
      'va': rng.uniform(-1, 1, (d, n, 2)).astype(np.float32),
      'va_mask': np.ones((d, n), bool),
      'mask': np.ones((d, n), bool)}
  return steps.shard(batch, devices)


def timed(fn: Callable[[], Any], warmup: int, repeats: int) -> np.ndarray:
  """Seconds of `repeats` calls of fn after `warmup` calls, each waited for."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return np.asarray(times)


def _cost(stage) -> dict:
  """XLA's cost analysis as one dict (a list of one in older JAX)."""
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return cost or {}


def peak_memory_bytes(device) -> int | None:
  """The backend's peak allocation on device, where it reports one."""
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  return (stats or {}).get('peak_bytes_in_use')


def step_config(config: ml_collections.ConfigDict, name: str,
                batch_size: int, image_size: int,
                dtype: str) -> ml_collections.ConfigDict:
  """config with one row's model, dtype, batch size and image size."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.name, config.model.dtype = name, dtype
  config.train.batch_size, config.data.image_size = batch_size, image_size
  return config


def compiled_step(config: ml_collections.ConfigDict, devices: list):
  """(compiled train step, replicated state, batch, compile seconds, FLOPs).

  FLOPs per image of the train step and of the forward pass (the eval
  step), from XLA's cost analysis of the HLO before backend passes: after
  them, GPU convolutions are library calls that the analysis cannot see.
  """
  num_classes = len(labels.run_classes(config))
  model = models.create_model(config.model, axis_name=steps.AXIS,
                              num_classes=num_classes)
  tx = steps.create_optimizer(config.train,
                              lambda _: config.train.learning_rate)
  state = steps.replicate(steps.create_train_state(
      model, tx, config.data.image_size, config.train.seed), devices)
  batch = random_batch(config.train.batch_size, config.data.image_size,
                       devices)
  p_train, p_eval = steps.pmap_steps(model, tx, config, devices=devices)
  start = time.perf_counter()
  lowered = p_train.lower(state, batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  per_device = config.train.batch_size // len(devices)
  flops = {
      'train_flops_per_image': _cost(lowered).get('flops', 0) / per_device,
      'model_flops_per_image': _cost(p_eval.lower(state, batch)).get(
          'flops', 0) / per_device}
  return compiled, state, batch, compile_s, flops


def benchmark_step(config: ml_collections.ConfigDict, devices: list
                   ) -> tuple[dict, Callable, dict]:
  """One configuration's train step on device-resident data.

  Returns the row, the compiled step and a holder of its current state.
  """
  bench = config.benchmark
  compiled, state, batch, compile_s, flops = compiled_step(config, devices)
  holder = {'state': state}

  def step():
    holder['state'], metrics = compiled(holder['state'], batch)
    return metrics

  times = timed(step, bench.warmup_steps, bench.steps)
  median = float(np.median(times))
  batch_size = config.train.batch_size
  peak = peak_memory_bytes(devices[0])
  row = {
      'step_ms_median': median * 1e3,
      'step_ms_p10': float(np.percentile(times, 10)) * 1e3,
      'step_ms_p90': float(np.percentile(times, 90)) * 1e3,
      'compile_s': compile_s,
      'images_per_sec': batch_size / median,
      'images_per_sec_per_device': batch_size / median / len(devices),
      **flops,
      'achieved_tflops': (flops['train_flops_per_image'] * batch_size
                          / median / 1e12),
      'peak_memory_gb': peak / 2**30 if peak else None,
      'loss_finite': bool(np.isfinite(np.asarray(step()['loss'])).all()),
  }
  return row, compiled, holder


def check_pipeline_size(config: ml_collections.ConfigDict, num_records: int,
                        batch_size: int) -> None:
  """Raises unless one epoch holds the warm-up and timed pipeline batches."""
  needed = (config.benchmark.warmup_steps
            + config.benchmark.pipeline_batches) * batch_size
  if num_records < needed:
    raise errors.UsageError(
        f'benchmark.pipeline_batches: {needed} training images needed, the '
        f'train split has {num_records}; raise data.synthetic.num_train')


def pipeline_records(config: ml_collections.ConfigDict):
  """The train split the pipeline rows read (generated if synthetic)."""
  splits, _ = data.load_splits(config)
  return splits['train']


def _take(batches: Iterator[dict], count: int) -> Iterator[dict]:
  for _, batch in zip(range(count), batches):
    yield batch


def benchmark_pipeline(config: ml_collections.ConfigDict, records,
                       num_devices: int) -> dict:
  """Images/s of the training pipeline alone, after warm-up batches."""
  bench = config.benchmark
  batches = pipeline.train_batches(records, config, num_devices)
  try:  # closed: its worker processes would compete with the next row's
    for _ in _take(batches, bench.warmup_steps):
      pass
    start = time.perf_counter()
    count = sum(1 for _ in _take(batches, bench.pipeline_batches))
    seconds = time.perf_counter() - start
  finally:
    batches.close()
  workers = config.data.num_workers
  return {'pipeline_images_per_sec': count * config.train.batch_size / seconds,
          'pipeline_images_per_sec_per_worker':
              count * config.train.batch_size / seconds / max(workers, 1),
          'num_workers': workers, 'num_threads': config.data.num_threads}


def benchmark_fed(config: ml_collections.ConfigDict, records,
                  num_devices: int, compiled: Callable, holder: dict) -> dict:
  """Images/s of train steps fed by the pipeline (host to device included)."""
  bench = config.benchmark
  batches = pipeline.train_batches(records, config, num_devices)

  def step():  # as in training: the host batch goes to the devices here
    holder['state'], metrics = compiled(holder['state'], next(batches))
    return metrics

  try:
    times = timed(step, bench.warmup_steps, bench.pipeline_batches)
  finally:
    batches.close()
  return {'fed_images_per_sec': config.train.batch_size / float(
      np.median(times))}


def _grid(bench: ml_collections.ConfigDict):
  for name in bench.models:
    for dtype in bench.dtypes:
      for image_size in bench.image_sizes:
        for batch_size in bench.batch_sizes:
          yield name, batch_size, image_size, dtype


def data_config(config: ml_collections.ConfigDict,
                image_size: int) -> ml_collections.ConfigDict:
  """The pipeline benchmark's data: a small synthetic set at image_size."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.image_size = image_size
  config.data.synthetic.image_size = image_size
  return config


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Every row of config.benchmark; writes workdir/benchmark.json."""
  devices = jax.local_devices()
  bench = config.benchmark
  rows, records = [], {}
  for _, batch_size, image_size, _ in _grid(bench):  # refused before timing
    if batch_size % len(devices):
      raise errors.UsageError(f'benchmark.batch_sizes: {batch_size} is not '
                              f'divisible by {len(devices)} devices')
    if bench.pipeline:
      if image_size not in records:
        records[image_size] = pipeline_records(
            data_config(config, image_size))
      check_pipeline_size(config, len(records[image_size]), batch_size)
  for name, batch_size, image_size, dtype in _grid(bench):
    row_config = step_config(config, name, batch_size, image_size, dtype)
    row = {'framework': 'jax', 'model': name, 'batch_size': batch_size,
           'image_size': image_size, 'dtype': dtype,
           'num_devices': len(devices), 'device_kind': devices[0].device_kind,
           'backend': jax.default_backend(), 'jax': jax.__version__,
           'mode': 'pmap', 'host': platform.node(),
           'xla_flags': os.environ.get('XLA_FLAGS', ''), **hugepages.record()}
    row['kernels'] = kernels_impl(config.model.get('kernels', 'auto'))
    logging.info('benchmark: %s bs %d %d px %s', name, batch_size, image_size,
                 dtype)
    step_row, compiled, holder = benchmark_step(row_config, devices)
    row.update(step_row)
    if bench.pipeline:
      row_config = data_config(row_config, image_size)
      row.update(benchmark_pipeline(row_config, records[image_size],
                                    len(devices)))
      row.update(benchmark_fed(row_config, records[image_size], len(devices),
                               compiled, holder))
    rows.append(row)
    print(format_table([row], header=len(rows) == 1), flush=True)
    if jax.process_index() == 0:  # after each row, in case time runs out
      os.makedirs(workdir, exist_ok=True)
      files.write_json(os.path.join(workdir, 'benchmark.json'), rows)
  print(format_table(rows))
  return rows


# (row key, header, width, format spec) of the printed table.
COLUMNS = (('framework', 'framework', 9, ''), ('mode', 'mode', 8, ''),
           ('model', 'model', 15, ''), ('kernels', 'kernels', 7, ''),
           ('dtype', 'dtype', 8, ''),
           ('batch_size', 'batch', 5, 'd'), ('image_size', 'px', 4, 'd'),
           ('compile_s', 'compile s', 9, '.1f'),
           ('step_ms_median', 'step ms', 9, '.1f'),
           ('images_per_sec', 'img/s', 9, '.1f'),
           ('achieved_tflops', 'TFLOP/s', 7, '.2f'),
           ('peak_memory_gb', 'GiB', 5, '.1f'),
           ('pipeline_images_per_sec', 'pipe img/s', 10, '.0f'),
           ('fed_images_per_sec', 'fed img/s', 9, '.1f'))


def format_table(rows: list[dict], header: bool = True) -> str:
  """Rows (of either framework) as aligned text; '-' where a value is absent."""
  lines = [' '.join(f'{h:>{w}}' for _, h, w, _ in COLUMNS)] if header else []
  for row in rows:
    lines.append(' '.join(
        '-'.rjust(w) if row.get(key) is None else f'{row[key]:>{w}{spec}}'
        for key, _, w, spec in COLUMNS))
  return '\n'.join(lines)
