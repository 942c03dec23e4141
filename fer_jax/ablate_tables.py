"""An ablation's tables, from its runs' own test reports: ablation.csv
(one row per run), ablation.md (mean and spread per variant, differences to
the baseline, recall per class) and ablation.png."""

import json
import math
from pathlib import Path

import ml_collections
import numpy as np

from fer_jax import (config_rules, figures, files, reporting,
                     workdir as workdir_lib)
from fer_jax.ablate_tasks import Run, run_status
from fer_jax.labels import EXPRESSIONS
from fer_jax.metrics import mean_std

# Metrics where lower is better contain one of these.
LOWER_IS_BETTER = ('rmse', 'mae', 'loss', 'seconds')


def status(one: Run, changed: dict | None, stale_lock_hours: float) -> str:
  """A run's status in the tables: run_status's, or 'config differs'."""
  return 'config differs' if changed else run_status(one, stale_lock_hours)


def collect_row(one: Run, changed: dict | None, stale_lock_hours: float
                ) -> dict:
  """One csv row: the run, its status and, if finished, its test metrics."""
  row = {'variant': one.variant, 'seed': one.seed,
         'status': status(one, changed, stale_lock_hours),
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


def write_settled_tables(workdir: Path, config: ml_collections.ConfigDict,
                         runs: list[Run], changed: dict) -> list[dict]:
  """Writes the tables from the runs' reports until no run has changed
  status while they were written, and returns their rows: of several
  processes that write them (tasks, collect_only), the last one to end
  leaves the tables of every run finished by then."""
  hours = config.ablate.stale_lock_hours
  while True:
    rows = [collect_row(one, changed.get(one.workdir), hours) for one in runs]
    write_tables(workdir, config, rows)
    if [status(one, changed.get(one.workdir), hours) for one in runs] == [
        row['status'] for row in rows]:
      return rows
