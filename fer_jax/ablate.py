"""--mode=ablate: every variant x seed of an ablation config, then one table.

Each run is an ordinary training workdir, workdir/<variant>/seed_<k>,
trained by `main.py --mode=train` in a process of its own: a finished one
(it has report/test_metrics.json) is skipped, an interrupted one resumes
from its checkpoints, one that another process is training is left to it
(run_lock.py), and one that fails leaves error.txt and does not stop the
others. The tables gather them from the runs' own test reports
(ablate_tables.py); the runs as tasks for a scheduler: ablate_tasks.py;
several at once on one host: ablate_processes.py.
"""

import copy
import difflib
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_collections
from absl import logging

from fer_jax import (ablate_processes, ablate_tasks, config_rules, files,
                     run_lock, steps, workdir as workdir_lib)
from fer_jax.ablate_tables import write_settled_tables
from fer_jax.ablate_tasks import Run, run_status
from fer_jax.config_rules import UsageError

# What a run may differ in from the ablation's config and still count:
# where and how fast it reads and writes. Not its number of epochs, which
# is part of the comparison.
ALLOWED_CHANGES = tuple(f for f in config_rules.HOW_FIELDS
                        if f != 'train.num_epochs')
_VARIANT_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.+=-]*')


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


def run(config: ml_collections.ConfigDict, workdir: str,
        config_args: list[str] | None = None) -> list[dict]:
  """Trains every unfinished run, or those of ablate.only (none under
  ablate.collect_only), then writes ablation.csv, ablation.md and
  ablation.png; returns the csv's rows. Under ablate.plan_only, writes the
  runs' command lines instead and returns [].

  config_args: the --config flags that make config on a command line, for
  plan_only's command lines; None: they read it from a saved copy.
  """
  workdir, ablate = Path(workdir), config.ablate
  runs = plan(config, workdir)
  ablate_tasks.check_settings(ablate)
  chosen = ablate_tasks.select(runs, ablate.only)
  changed = {one.workdir: config_differences(one) for one in runs}
  changed = {path: diff for path, diff in changed.items() if diff}
  if not ablate.collect_only:
    refuse_other_configs(changed)
    for one in chosen:  # each run checks its batch against its devices
      config_rules.check(one.config, num_devices=None)
  if ablate.plan_only:
    ablate_tasks.write_plan(workdir, config, runs, chosen, config_args)
    return []
  statuses = [run_status(one, ablate.stale_lock_hours) for one in runs]
  # Seed by seed, so that an early stop leaves every variant compared.
  todo = [] if ablate.collect_only else sorted(
      (one for one, s in zip(runs, statuses) if s != 'finished' and
       one in chosen), key=lambda one: list(ablate.seeds).index(one.seed))
  slots = ablate_processes.device_slots(ablate, len(todo),
                                    ablate_processes.visible_gpus())
  files.write_json(workdir / 'ablation_config.json',
                   config_rules.as_json(config))
  print(f'Ablation in {workdir}: {len(runs)} runs; ' + ', '.join(
      f'{statuses.count(s)} {s}' for s in dict.fromkeys(statuses)),
        flush=True)
  if len(slots) > 1:
    ablate_processes.train_parallel(todo, slots, workdir / 'compile_cache',
                                ablate.stale_lock_hours, ablate.metrics[0])
  else:
    train_serially(todo, workdir / 'compile_cache', ablate.stale_lock_hours)
  rows = write_settled_tables(workdir, config, runs, changed)
  failed = [row for row, one in zip(rows, runs)
            if row['status'] == 'failed' and one in chosen]
  if failed:
    raise RuntimeError(
        f'{len(failed)} of {len(rows)} runs failed; the tables hold the '
        'others. Each failed folder has error.txt; running again retries '
        'them:\n' + '\n'.join(f"  {r['workdir']}: {r['error']}"
                              for r in failed))
  return rows


def refuse_other_configs(changed: dict) -> None:
  """UsageError naming the run folders started with another config."""
  if changed:
    raise UsageError(
        'these runs were started with another config, so neither skipping '
        'nor resuming them would give this ablation\'s result:\n' +
        '\n'.join(f'  {path}: {config_rules.describe(diff)}'
                  for path, diff in changed.items()) +
        '\nDelete those folders to run them with this config, or use '
        'another --workdir.')


def train_serially(todo: list[Run], compile_cache: Path,
                   stale_lock_hours: float) -> None:
  """Trains the runs one after another, each while holding its lock."""
  start = time.perf_counter()
  for i, one in enumerate(todo):
    if not ablate_processes.claim(one, stale_lock_hours):
      continue
    print(f'\n=== run {i + 1} of {len(todo)}: {one.variant}, seed '
          f'{one.seed} ({one.workdir}) ===', flush=True)
    try:
      train_one(one, compile_cache)
    finally:
      run_lock.release(one.workdir)
    spent = time.perf_counter() - start
    print(f'=== {i + 1} of {len(todo)} runs in {spent / 60:.1f} min; '
          f'about {spent / (i + 1) * (len(todo) - i - 1) / 60:.1f} min '
          'to go ===', flush=True)


def train_one(one: Run, compile_cache: Path | None = None) -> None:
  """Trains (or resumes) one run with --mode=train, in a process of its
  own, so that nothing it starts (Grain workers, threads, device memory)
  outlives it; a failure's output ends in its error.txt.

  compile_cache: JAX's persistent compilation cache for the run, unless
  JAX_COMPILATION_CACHE_DIR is set.
  """
  error_file = one.workdir / 'error.txt'
  with tempfile.TemporaryDirectory() as folder:
    command, env = ablate_processes.child_command(
        one, Path(folder) / 'config.json', compile_cache)
    with ablate_processes.popen(command, stderr=subprocess.PIPE,
                                env=env) as process:
      try:
        tail = b''
        while chunk := process.stderr.read1(1 << 16):
          sys.stderr.buffer.write(chunk)  # its log and progress bars, live
          sys.stderr.buffer.flush()
          tail = (tail + chunk)[-ablate_processes.ERROR_TAIL_BYTES:]
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
