"""Rows of benchmarks/gpu_check.sh, appended to a JSON-lines file as measured.

Every row is one line of --rows, written (and flushed) when it is known, so
a run cut short by its time limit keeps the rows it reached.

  collect FILE...   the rows of benchmark.json or torch_reference's JSON
                    (--merge_into: also appended to that JSON list)
  profile           a jax.profiler trace of each model's train step, as
                    the top ops per step (benchmarks/profile_step.py)
  fed               the Grain pipeline at several data.num_workers: alone,
                    and feeding the train step compiled once (benchmark.py)
  job PHASE WORKDIR what a phase of the whole job left in its workdir:
                    killed, trained, evaluated, predicted

  python -m benchmarks.gpu_rows fed --config=configs/benchmark.py \\
      --workers=8,15 --rows=runs/gpu_check/rows.jsonl
"""

import csv
import glob
import json
import os
import re

import ml_collections
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/benchmark.py',
                                'profile, fed: the benchmark config (fed: '
                                'its first model; both: its first dtype, '
                                'image size and batch size).')
flags.DEFINE_string('rows', 'runs/gpu_check/rows.jsonl', 'Rows go here.')
flags.DEFINE_string('part', 'step', 'collect: the rows\' part.')
flags.DEFINE_string('merge_into', '', 'collect: also append to this JSON list.')
flags.DEFINE_list('workers', ['8', '15'], 'fed: data.num_workers values.')
flags.DEFINE_string('trace_dir', '/tmp/fer_jax_profile',
                    'profile: jax.profiler\'s output.')
flags.DEFINE_integer('steps', 3, 'profile: traced steps, after the warm-up.')
flags.DEFINE_integer('top', 15, 'profile: ops listed per model.')
flags.DEFINE_string('out', 'runs/gpu_check/profile.md',
                    'profile: the tables, as markdown.')
flags.DEFINE_string('log', '', 'job: the output of the phase\'s command.')
flags.DEFINE_float('seconds', None, 'job: wall seconds of the phase.')
flags.DEFINE_integer('exit_code', None, 'job: the command\'s exit status.')


def append_row(path: str, row: dict) -> None:
  """One row as one JSON line at the end of path; also printed."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  line = json.dumps(row, default=float)
  with open(path, 'a') as f:
    f.write(line + '\n')
  print('row:', line[:600], flush=True)


def read_rows(path: str) -> list[dict]:
  """The rows of a JSON list, or of JSON lines; [] if there is no file."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    text = f.read().strip()
  if text.startswith('['):
    return json.loads(text)
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def collect(paths: list[str], part: str, rows: str, merge_into: str) -> None:
  """Appends each file's rows, tagged with part."""
  found = [r for p in paths for r in read_rows(p)]
  for row in found:
    append_row(rows, {'part': part, **row})
  if merge_into and found:
    os.makedirs(os.path.dirname(os.path.abspath(merge_into)), exist_ok=True)
    merged = read_rows(merge_into) + found
    with open(merge_into, 'w') as f:
      json.dump(merged, f, indent=1)


def fed(config: ml_collections.ConfigDict, workers: list[int],
        rows: str) -> None:
  """The synthetic-batch step, then per worker count the pipeline alone and
  the same compiled step fed by it: which of the two bounds training."""
  import jax
  from fer_jax import benchmark
  bench, devices = config.benchmark, jax.local_devices()
  name, dtype = bench.models[0], bench.dtypes[0]
  size, batch = bench.image_sizes[0], bench.batch_sizes[0]
  step_config = benchmark.data_config(
      benchmark.step_config(config, name, batch, size, dtype), size)
  records = benchmark.pipeline_records(step_config)
  needed = (bench.warmup_steps + bench.pipeline_batches) * batch
  # Batches may cross epochs (each a new permutation): a small set will do.
  step_config.train.num_epochs = needed // len(records) + 2
  head = {'part': 'fed', 'model': name, 'dtype': dtype, 'image_size': size,
          'batch_size': batch, 'device_kind': devices[0].device_kind,
          'train_images': len(records),
          'erasing_prob': step_config.data.augment.erasing_prob}
  step_row, compiled, holder = benchmark.benchmark_step(step_config, devices)
  step_rate = step_row['images_per_sec']
  append_row(rows, {**head, 'num_workers': None,
                    'step_images_per_sec': step_rate,
                    'compile_s': step_row['compile_s']})
  for count in workers:
    step_config.data.num_workers = count
    row = {**head, **benchmark.benchmark_pipeline(step_config, records,
                                                  len(devices))}
    row.update(benchmark.benchmark_fed(step_config, records, len(devices),
                                       compiled, holder))
    row['step_images_per_sec'] = step_rate
    row['fed_over_step'] = row['fed_images_per_sec'] / step_rate
    row['fed_over_pipeline'] = (row['fed_images_per_sec'] /
                                row['pipeline_images_per_sec'])
    append_row(rows, row)


def _checkpoints(workdir: str) -> list[int]:
  """Steps of the complete checkpoints (Orbax renames a finished one)."""
  folder = os.path.join(workdir, 'checkpoints')
  names = os.listdir(folder) if os.path.isdir(folder) else []
  return sorted(int(name) for name in names if name.isdigit())


def _steps_per_epoch(workdir: str) -> int | None:
  """Training steps per epoch of the run in workdir, from its record."""
  import numpy as np
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      batch = json.load(f)['train']['batch_size']
    with np.load(os.path.join(workdir, 'splits.npz')) as splits:
      return len(splits['train']) // batch
  except (OSError, KeyError):
    return None


def _read_json(path: str | None) -> dict:
  """A JSON file's dict; {} if there is none."""
  if not path or not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _newest(pattern: str) -> str | None:
  found = glob.glob(pattern)
  return max(found, key=os.path.getmtime) if found else None


def _step_rate(rows: str) -> float | None:
  """The synthetic-batch step's img/s that part c measured, if it did."""
  return next((r['step_images_per_sec'] for r in read_rows(rows)
               if r.get('part') == 'fed' and r.get('step_images_per_sec')),
              None)


def _trained(workdir: str, text: str, rows: str) -> dict:
  """Where the run resumed, its epochs' img/s, its test report."""
  found = re.search(r'Resuming from the checkpoint of step (\d+) \((.*?)\)'
                    r' in', text)
  step = int(found.group(1)) if found else None
  per_epoch = _steps_per_epoch(workdir)
  epochs = read_rows(os.path.join(workdir, 'metrics.jsonl'))
  test = _read_json(os.path.join(workdir, 'report', 'test_metrics.json'))
  return {'resumed_from_step': step,
          'resumed_at': found.group(2) if found else None,
          'steps_per_epoch': per_epoch,
          'mid_epoch': bool(step and per_epoch and step % per_epoch),
          'train_images_per_sec': [e.get('images_per_sec') for e in epochs],
          'step_images_per_sec': _step_rate(rows),
          'train_seconds': epochs[-1]['train_seconds'] if epochs else None,
          'test_metrics_exists': bool(test),
          'test_accuracy': test.get('accuracy'),
          'test_macro_f1': test.get('macro_f1'),
          'best_step': test.get('checkpoint_step'),
          'epochs_trained': test.get('epochs_trained')}


def _evaluated(workdir: str) -> dict:
  """The newest evaluation's test metrics, against training's own."""
  path = _newest(os.path.join(workdir, 'report', 'eval', '*',
                              'test_metrics.json'))
  result = _read_json(path)
  trained = _read_json(os.path.join(workdir, 'report', 'test_metrics.json'))
  return {'metrics_file': path and os.path.relpath(path, workdir),
          'accuracy': result.get('accuracy'),
          'same_as_training': (result.get('accuracy') ==
                               trained.get('accuracy') if result else None)}


def _predicted(workdir: str) -> dict:
  """The newest predictions.csv: its rows and first expressions."""
  path = _newest(os.path.join(workdir, 'report', 'predict', '*',
                              'predictions.csv'))
  predictions = []
  if path:
    with open(path) as f:
      predictions = list(csv.DictReader(f))
  return {'predictions_file': path and os.path.relpath(path, workdir),
          'predictions_rows': len(predictions),
          'expressions': [p['expression'] for p in predictions][:8]}


def job_row(phase: str, workdir: str, log: str, rows: str) -> dict:
  """What one phase of the whole job left in its workdir, as a row."""
  text = ''
  if log and os.path.exists(log):
    with open(log, errors='replace') as f:
      text = f.read()
  if phase == 'killed':
    found = {'checkpoints': _checkpoints(workdir),
             'steps_per_epoch': _steps_per_epoch(workdir)}
  elif phase == 'trained':
    found = _trained(workdir, text, rows)
  elif phase == 'evaluated':
    found = _evaluated(workdir)
  else:  # predicted, predicted_photo
    found = _predicted(workdir)
  return {'part': 'job', 'phase': phase, **found}


def main(argv):
  command, *args = argv[1:] or ['']
  if command == 'collect':
    collect(args, FLAGS.part, FLAGS.rows, FLAGS.merge_into)
  elif command == 'profile':
    from benchmarks import profile_step
    for row in profile_step.profile(FLAGS.config, FLAGS.trace_dir,
                                    FLAGS.steps, FLAGS.top, FLAGS.out):
      append_row(FLAGS.rows, row)
  elif command == 'fed':
    fed(FLAGS.config, [int(w) for w in FLAGS.workers], FLAGS.rows)
  elif command == 'job' and len(args) == 2:
    row = job_row(args[0], args[1], FLAGS.log, FLAGS.rows)
    append_row(FLAGS.rows, {**row, 'seconds': FLAGS.seconds,
                            'exit_code': FLAGS.exit_code})
  else:
    raise app.UsageError('collect FILE... | profile | fed | job PHASE WORKDIR')


if __name__ == '__main__':
  app.run(main)
