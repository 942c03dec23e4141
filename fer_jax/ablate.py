"""--mode=ablate: every variant x seed of an ablation config, then one table.

Each run is an ordinary training workdir, workdir/<variant>/seed_<k>,
trained by `main.py --mode=train` in a process of its own: a finished one
(it has report/test_metrics.json) is skipped, an interrupted one resumes
from its checkpoints, and one that fails leaves error.txt and does not stop
the others. ablation.csv (one row per run), ablation.md (mean and spread per
variant, differences to the baseline) and ablation.png gather them from the
runs' own test reports.
"""

import copy
import dataclasses
import difflib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_collections
import numpy as np
from absl import logging

from fer_jax import (config_rules, figures, files, reporting, steps,
                     workdir as workdir_lib)
from fer_jax.config_rules import UsageError
from fer_jax.labels import EXPRESSIONS
from fer_jax.metrics import mean_std

PACKAGE = Path(__file__).resolve().parent
# What a run may differ in from the ablation's config and still count:
# where and how fast it reads and writes. Not its number of epochs, which
# is part of the comparison.
ALLOWED_CHANGES = tuple(f for f in config_rules.HOW_FIELDS
                        if f != 'train.num_epochs')
# Metrics where lower is better contain one of these.
LOWER_IS_BETTER = ('rmse', 'mae', 'loss', 'seconds')
_VARIANT_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.+=-]*')


@dataclasses.dataclass
class Run:
  """One variant trained with one seed."""
  variant: str
  seed: int
  workdir: Path
  config: ml_collections.ConfigDict


def run_status(run: Run) -> str:
  """'finished' | 'failed' | 'interrupted' | 'not run', from its files."""
  if workdir_lib.test_report(run.workdir).exists():
    return 'finished'
  if (run.workdir / 'error.txt').exists():
    return 'failed'
  if (run.workdir / 'checkpoints').exists():
    return 'interrupted'
  return 'not run'


def set_field(config: ml_collections.ConfigDict, path: str, value,
              where: str) -> None:
  """config's field at the dotted path = value, with errors that name where."""
  node, (*parents, name) = config, path.split('.')
  for part in parents:
    node = node.get(part) if isinstance(node, ml_collections.ConfigDict) \
        else None
  if not isinstance(node, ml_collections.ConfigDict) or name not in node:
    fields = config_rules.flatten(config.to_dict())
    close = difflib.get_close_matches(path, fields, n=1)
    raise UsageError(f'{where}: {path!r} is not a field of the base config'
                     + (f'; did you mean {close[0]!r}?' if close else ''))
  try:
    node[name] = tuple(value) if isinstance(value, list) else value
  except TypeError as error:
    raise UsageError(f'{where}: {path}={value!r}: {error}') from None


def run_config(base: ml_collections.ConfigDict, fields: dict, seed: int,
               seed_fields: tuple[str, ...], where: str
               ) -> ml_collections.ConfigDict:
  """The base config with a variant's fields and the seed set."""
  config = copy.deepcopy(base)  # keeps field references (image sizes)
  for path, value in fields.items():
    set_field(config, path, value, where)
  for path in seed_fields:
    set_field(config, path, seed, 'ablate.seed_fields')
  return config


def plan(config: ml_collections.ConfigDict, workdir: Path) -> list[Run]:
  """Every variant x seed with its config, after checking the ablate section."""
  ablate = config.ablate
  names = [name for name, _ in ablate.variants]
  for name in names:
    if not _VARIANT_NAME.fullmatch(name):
      raise UsageError(f'ablate.variants: {name!r} is not a folder name '
                       '(letters, digits, _ . + = -)')
  if len(set(names)) < len(names) or not names:
    raise UsageError(f'ablate.variants: names must be unique and at least '
                     f'one: {names}')
  if ablate.baseline not in names:
    raise UsageError(f'ablate.baseline: {ablate.baseline!r} is not one of '
                     f'the variants {names}')
  seeds = list(ablate.seeds)
  if not seeds or len(set(seeds)) < len(seeds):
    raise UsageError(f'ablate.seeds: {seeds} must be unique and at least one')
  return [Run(name, seed, workdir / name / f'seed_{seed}',
              run_config(config.base, fields, seed, ablate.seed_fields,
                         f'ablate.variants[{name!r}]'))
          for name, fields in ablate.variants for seed in seeds]


def config_differences(run: Run) -> dict:
  """{field: (old, new)} between a run folder's config.json and its config,
  but for ALLOWED_CHANGES, and 'training_rules' for a run finished under
  other rules (steps.TRAINING_RULES); {} for a run not started."""
  path = run.workdir / 'config.json'
  if not path.exists():
    return {}
  changed = config_rules.meaning_changes(workdir_lib.read_json(path),
                                         run.config, ALLOWED_CHANGES)
  report = workdir_lib.test_report(run.workdir)
  rules = (steps.rules_of(workdir_lib.read_json(report))
           if report.exists() else steps.TRAINING_RULES)
  if rules != steps.TRAINING_RULES:
    changed['training_rules'] = (rules, steps.TRAINING_RULES)
  return changed


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Trains every unfinished run (unless ablate.collect_only), then writes
  ablation.csv, ablation.md and ablation.png. Returns the csv's rows."""
  workdir = Path(workdir)
  runs = plan(config, workdir)
  changed = {one.workdir: config_differences(one) for one in runs}
  changed = {path: diff for path, diff in changed.items() if diff}
  if changed and not config.ablate.collect_only:
    raise UsageError(
        'these runs were started with another config, so neither skipping '
        'nor resuming them would give this ablation\'s result:\n' +
        '\n'.join(f'  {path}: {config_rules.describe(diff)}'
                  for path, diff in changed.items()) +
        '\nDelete those folders to run them with this config, or use '
        'another --workdir.')
  if not config.ablate.collect_only:
    for one in runs:  # each run checks its batch against its devices
      config_rules.check(one.config, num_devices=None)
  files.write_json(workdir / 'ablation_config.json',
                   config_rules.as_json(config))
  statuses = [run_status(one) for one in runs]
  print(f'Ablation in {workdir}: {len(runs)} runs; ' + ', '.join(
      f'{statuses.count(s)} {s}' for s in dict.fromkeys(statuses)))
  if not config.ablate.collect_only:
    # Seed by seed, so that an early stop leaves every variant compared.
    todo = sorted((one for one, s in zip(runs, statuses) if s != 'finished'),
                  key=lambda one: list(config.ablate.seeds).index(one.seed))
    start = time.perf_counter()
    for i, one in enumerate(todo):
      print(f'\n=== run {i + 1} of {len(todo)}: {one.variant}, seed '
            f'{one.seed} ({one.workdir}) ===')
      train_one(one, workdir / 'compile_cache')
      spent = time.perf_counter() - start
      print(f'=== {i + 1} of {len(todo)} runs in {spent / 60:.1f} min; '
            f'about {spent / (i + 1) * (len(todo) - i - 1) / 60:.1f} min '
            'to go ===')
  rows = [collect_row(one, changed.get(one.workdir)) for one in runs]
  write_tables(workdir, config, rows)
  failed = [r for r in rows if r['status'] == 'failed']
  if failed:
    raise RuntimeError(
        f'{len(failed)} of {len(rows)} runs failed; the tables hold the '
        'others. Each failed folder has error.txt; running again retries '
        'them:\n' + '\n'.join(f"  {r['workdir']}: {r['error']}"
                              for r in failed))
  return rows


def train_one(one: Run, compile_cache: Path | None = None) -> None:
  """Trains (or resumes) one run with --mode=train, in a process of its
  own, so that nothing it starts (Grain workers, threads, device memory)
  outlives it; a failure's output ends in its error.txt.

  compile_cache: JAX's persistent compilation cache for the run, unless
  JAX_COMPILATION_CACHE_DIR is set: the seeds of a variant compile the same
  programs, so all but the first read them from disk.
  """
  error_file = one.workdir / 'error.txt'
  with tempfile.TemporaryDirectory() as folder:
    config_file = Path(folder) / 'config.json'
    files.write_json(config_file, config_rules.as_json(one.config))
    command = [sys.executable, '-m', 'fer_jax.cli', '--mode=train',
               f"--config={PACKAGE / 'configs' / 'saved.py'}:{config_file}",
               f'--workdir={one.workdir}', '--num_processes=1']
    # The child imports this fer_jax, installed or not.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(PACKAGE.parent)] + [p for p in os.environ.get(
            'PYTHONPATH', '').split(os.pathsep) if p]))
    if compile_cache is not None:
      env.setdefault('JAX_COMPILATION_CACHE_DIR', str(compile_cache))
    with subprocess.Popen(command, stderr=subprocess.PIPE,
                          env=env) as process:
      try:
        tail = b''
        while chunk := process.stderr.read1(1 << 16):
          sys.stderr.buffer.write(chunk)  # its log and progress bars, live
          sys.stderr.buffer.flush()
          tail = (tail + chunk)[-(1 << 16):]
      except BaseException:  # Ctrl-C, a closed terminal: the run stops too
        process.kill()
        raise
  if process.returncode:
    one.workdir.mkdir(parents=True, exist_ok=True)
    files.write_text(error_file, tail.decode(errors='replace'))
    logging.error('%s failed (exit code %d); its output is in %s',
                  one.workdir, process.returncode, error_file)
  else:
    error_file.unlink(missing_ok=True)


def collect_row(one: Run, changed: dict | None) -> dict:
  """One csv row: the run, its status and, if finished, its test metrics."""
  row = {'variant': one.variant, 'seed': one.seed,
         'status': 'config differs' if changed else run_status(one),
         'error': '', 'workdir': str(one.workdir)}
  if row['status'] == 'failed':
    lines = (one.workdir / 'error.txt').read_text().strip().splitlines()
    row['error'] = lines[-1] if lines else ''
  if row['status'] != 'finished':
    return row
  metrics = workdir_lib.read_json(workdir_lib.test_report(one.workdir))
  for key in ('best_epoch', 'epochs_trained', 'train_seconds'):
    row[key] = metrics.get(key)
  row.update({k: v for k, v in metrics.items() if k not in row and
              (v is None or isinstance(v, (int, float)))})
  for kind in ('recall', 'precision', 'f1'):
    row.update({f'{kind}_{name}': values[kind]
                for name, values in metrics['per_class'].items()})
  return row


def paired_difference(rows: list[dict], base_rows: list[dict], key: str
                      ) -> tuple[float, float | None, int] | None:
  """Mean of (row - baseline) over the seeds both have, its standard error
  and the number of pairs; None without pairs."""
  base = {r['seed']: r[key] for r in base_rows if r.get(key) is not None}
  diffs = [r[key] - base[r['seed']] for r in rows
           if r.get(key) is not None and r['seed'] in base]
  if not diffs:
    return None
  mean, std = mean_std(diffs)
  return mean, (std / math.sqrt(len(diffs)) if std is not None else None), \
      len(diffs)


def _cell(mean: float | None, spread: float | None, signed: bool = False,
          digits: int = 3) -> str:
  """'mean ± spread' with `digits` decimals; '-' without a mean."""
  if mean is None:
    return '-'
  text = f'{mean:+.{digits}f}' if signed else f'{mean:.{digits}f}'
  return text + (f' ± {spread:.{digits}f}' if spread is not None else '')


def _stat_row(rows: list[dict], keys: list[str]) -> list:
  """(mean, std) per key over the rows that have it; (None, None) if none."""
  out = []
  for key in keys:
    values = [r[key] for r in rows if r.get(key) is not None]
    out.append(mean_std(values) if values else (None, None))
  return out


def _marked_table(header: list[str], names: list[str], stats: list[list],
                  keys: list[str], after: list[list]) -> list[str]:
  """A markdown table of mean ± std cells, the best mean per column bold;
  after: each row's cells past the metrics."""
  best = []
  for j, key in enumerate(keys):
    means = [row[j][0] for row in stats if row[j][0] is not None]
    lower = any(part in key for part in LOWER_IS_BETTER)
    best.append((min if lower else max)(means) if len(means) > 1 else None)
  body = []
  for name, row, more in zip(names, stats, after):
    cells = [f'**{_cell(*s)}**' if s[0] is not None and s[0] == b
             else _cell(*s) for s, b in zip(row, best)]
    body.append([name, *cells, *more])
  return reporting.markdown_table(header, body)


def _run_columns(done: list[dict], num_seeds: int) -> list[str]:
  """Runs finished, epochs trained and minutes of training, for a variant."""
  minutes = [r['train_seconds'] / 60 for r in done
             if r.get('train_seconds') is not None]
  return [f'{len(done)}/{num_seeds}',
          _cell(*_stat_row(done, ['epochs_trained'])[0], digits=1),
          _cell(*mean_std(minutes), digits=1) if minutes else '-']


def recall_classes(rows: list[dict]) -> list[str]:
  """The classes with a recall_<class> column in rows, in their order (the
  base run's label space, then any a variant adds)."""
  return list(dict.fromkeys(k[len('recall_'):] for row in rows for k in row
                            if k.startswith('recall_')))


def ablation_markdown(title: str, config: ml_collections.ConfigDict,
                      rows: list[dict], class_shares: dict[str, float] | None
                      ) -> str:
  """ablation.md: the test metrics, differences to the baseline and per-class
  recall, as mean ± std over seeds per variant."""
  ablate, metrics = config.ablate, list(config.ablate.metrics)
  names = [name for name, _ in ablate.variants]
  done = {n: [r for r in rows if r['variant'] == n and
              r['status'] == 'finished'] for n in names}
  lines = [f'# Ablation: {title}', '',
           f'{len(names)} variants x {len(ablate.seeds)} seeds '
           f"({', '.join(ablate.seed_fields)} = "
           f"{', '.join(map(str, ablate.seeds))}), each tested on the test "
           'split with its best checkpoint by '
           f'`{config.base.train.best_metric}`. Cells: mean ± sample '
           'standard deviation over the seeds that finished; **bold**: the '
           'best mean in its column.', '',
           'The base config, which each variant changes as listed under '
           'Variants:', '']
  lines += [f'- **{name}**: {value}' for name, value in
            reporting.run_essentials(config_rules.as_json(config.base))[:3]]
  lines += ['', '## Test metrics', ''] + _marked_table(
      ['variant', *metrics, 'runs', 'epochs', 'minutes'], names,
      [_stat_row(done[n], metrics) for n in names], metrics,
      [_run_columns(done[n], len(ablate.seeds)) for n in names])

  baseline = ablate.baseline
  lines += ['', f'## Difference to `{baseline}`', '',
            'Mean over seeds of (variant - baseline) with the same seed, ± '
            'its standard error; n: the seeds both finished.', '']
  body = []
  for name in names:
    if name == baseline:
      continue
    diffs = [paired_difference(done[name], done[baseline], m)
             for m in metrics]
    pairs = max([d[2] for d in diffs if d] or [0])
    body.append([name, pairs] + [_cell(d[0], d[1], signed=True) if d
                                 else '-' for d in diffs])
  lines += reporting.markdown_table(['variant', 'n', *metrics], body)

  classes = recall_classes(rows)
  recall = [f'recall_{c}' for c in classes]
  shares = [f'{c} ({class_shares[c]:.1%})' if c in (class_shares or {})
            else c for c in classes]
  lines += ['', '## Test recall per class', '',
            'The header gives each class\'s share of the training split.', '']
  lines += _marked_table(['variant', *shares], names,
                         [_stat_row(done[n], recall) for n in names], recall,
                         [[] for _ in names])

  lines += ['', '## Variants', '']
  for name, fields in ablate.variants:
    set_fields = ', '.join(f'`{k}={v!r}`' for k, v in fields.items())
    lines.append(f"- **{name}**{' (baseline)' if name == baseline else ''}: "
                 f"{set_fields or 'the base config'}")
  missing = [r for r in rows if r['status'] != 'finished']
  if missing:
    lines += ['', '## Runs not in the tables', ''] + reporting.markdown_table(
        ['variant', 'seed', 'status', 'detail'],
        [[r['variant'], r['seed'], r['status'], r['error'] or r['workdir']]
         for r in missing])
  lines += ['', '![metrics per variant and seed](ablation.png)']
  return '\n'.join(lines) + '\n'


def _class_shares(rows: list[dict]) -> dict[str, float] | None:
  """Each class's share of the first finished run's training split."""
  for row in rows:
    report = Path(row['workdir']) / 'data_report.json'
    if row['status'] == 'finished' and report.exists():
      saved = json.loads(report.read_text())
      counts = np.asarray(saved['train']['class_counts'], dtype=np.float64)
      return dict(zip(saved.get('classes', EXPRESSIONS),
                      (counts / counts.sum()).tolist()))
  return None


def write_tables(workdir: Path, config: ml_collections.ConfigDict,
                 rows: list[dict]) -> None:
  """ablation.csv, ablation.md and ablation.png in workdir."""
  columns = list(dict.fromkeys(k for row in rows for k in row))
  files.write_csv(workdir / 'ablation.csv', columns, rows)
  markdown = ablation_markdown(workdir.name, config, rows,
                              _class_shares(rows))
  files.write_text(workdir / 'ablation.md', markdown)
  names = [name for name, _ in config.ablate.variants]
  classes = recall_classes(rows)
  finished = [r for r in rows if r['status'] == 'finished']
  values = {key: {n: [r[key] for r in finished if r['variant'] == n
                      and r.get(key) is not None] for n in names}
            for key in [*config.ablate.metrics,
                        *(f'recall_{c}' for c in classes)]}
  figures.plot_ablation(workdir / 'ablation.png', names,
                        list(config.ablate.metrics), values, classes)
  print(f'\n{markdown}\nTables in {workdir}: ablation.md, ablation.csv, '
        'ablation.png')
