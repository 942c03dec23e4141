"""An ablation's runs as tasks: which of them to train (ablate.only), and
one command line per run for a scheduler (ablate.plan_only): commands.txt
and a SLURM job array of its lines."""

import dataclasses
import os
import shlex
import sys
from pathlib import Path

import ml_collections

from fer_jax import config_rules, files, run_lock, workdir as workdir_lib
from fer_jax.config_rules import UsageError

PACKAGE = Path(__file__).resolve().parent
SAVED_CONFIG = PACKAGE / 'configs' / 'saved.py'  # a config.json as config
COMMANDS_FILE = 'commands.txt'
SLURM_FILE = 'slurm_array.sh'
# A plan made from Python (no config file to name): the ablation's config,
# which its command lines read with configs/saved.py.
PLAN_CONFIG = 'plan_config.json'
# The task lines set these themselves.
TASK_FIELDS = ('ablate.plan_only', 'ablate.only')


@dataclasses.dataclass
class Run:
  """One variant trained with one seed."""
  variant: str
  seed: int
  workdir: Path
  config: ml_collections.ConfigDict

  @property
  def name(self) -> str:
    return f'{self.variant}:{self.seed}'


def run_status(run: Run, stale_lock_hours: float) -> str:
  """'finished' | 'in progress' | 'failed' | 'interrupted' | 'not run',
  from its files."""
  if workdir_lib.test_report(run.workdir).exists():
    return 'finished'
  if run_lock.holder(run.workdir, stale_lock_hours):
    return 'in progress'
  if (run.workdir / 'error.txt').exists():
    return 'failed'
  if (run.workdir / 'checkpoints').exists():
    return 'interrupted'
  return 'not run'


def check_settings(ablate: ml_collections.ConfigDict) -> None:
  """Refuses, in one line, settings of ablate that cannot hold together."""
  for field in ('parallel_runs', 'devices_per_run'):
    if ablate[field] < 1:
      raise UsageError(f'ablate.{field}: {ablate[field]} is below 1')
  if not ablate.stale_lock_hours > 0:
    raise UsageError(f'ablate.stale_lock_hours: {ablate.stale_lock_hours} '
                     'is not above 0')
  if ablate.collect_only and (ablate.plan_only or ablate.only):
    raise UsageError('ablate.collect_only trains nothing: it goes with '
                     'neither ablate.plan_only nor ablate.only')


def select(runs: list[Run], only: str) -> list[Run]:
  """The runs that ablate.only names ('variant:seed', comma-separated), in
  the ablation's order; every run for ''."""
  if not only.strip():
    return list(runs)
  variants = list(dict.fromkeys(one.variant for one in runs))
  seeds = list(dict.fromkeys(one.seed for one in runs))
  named = []
  for item in (part.strip() for part in only.split(',')):
    variant, colon, seed = item.rpartition(':')
    if not colon:
      raise UsageError(f'ablate.only: {item!r} is not variant:seed, such as '
                       f'{runs[0].name!r}')
    if variant not in variants:
      raise UsageError(f'ablate.only: {item!r}: {variant!r} is not one of '
                       f"the variants {', '.join(variants)}")
    if not seed.lstrip('-').isdigit() or int(seed) not in seeds:
      raise UsageError(f'ablate.only: {item!r}: {seed!r} is not one of the '
                       f"seeds {', '.join(map(str, seeds))}")
    if (variant, int(seed)) in named:
      raise UsageError(f'ablate.only: {item!r} is named twice')
    named.append((variant, int(seed)))
  return [one for one in runs if (one.variant, one.seed) in named]


def _absolute(value: str) -> str:
  """value, made absolute if it is a relative path (with a /) that
  exists: a task may start in another folder."""
  if '/' in value and not os.path.isabs(value) and os.path.exists(value):
    return os.path.abspath(value)
  return value


def _flag_value(value) -> str:
  """A config field's value as its --config.<field>= flag reads it back."""
  if isinstance(value, str):
    return _absolute(value)
  if isinstance(value, list):
    value = tuple(value)
  return str(value) if isinstance(value, bool) else repr(value)


def config_flags(filename: str, overrides: dict) -> list[str]:
  """--config=<file>[:argument] and its overrides as flags that load the
  same config from any folder, but for the fields the tasks set."""
  path, colon, argument = filename.partition(':')
  flags = [f'--config={os.path.abspath(path)}{colon}{_absolute(argument)}']
  return flags + [f'--config.{field}={_flag_value(value)}'
                  for field, value in overrides.items()
                  if field not in TASK_FIELDS]


def python_path() -> str:
  """PYTHONPATH for a process that runs this fer_jax (installed or not)
  from any folder: its parent folder first, then this one's entries."""
  paths = [str(PACKAGE.parent)] + [os.path.abspath(p) for p in os.environ.get(
      'PYTHONPATH', '').split(os.pathsep) if p]
  return os.pathsep.join(dict.fromkeys(paths))


def command_line(config_args: list[str], workdir: Path, *flags: str) -> str:
  """A shell line that runs --mode=ablate with config_args and flags on
  the ablation in workdir, from any folder, with this interpreter and
  this fer_jax (installed or not)."""
  return shlex.join([
      'env', f'PYTHONPATH={python_path()}', sys.executable, '-m', 'fer_jax.cli', '--mode=ablate', *config_args,
      *flags, f'--workdir={Path(workdir).absolute()}'])


def saved_ablation(config: ml_collections.ConfigDict, runs: list[Run]
                   ) -> dict:
  """config as JSON that configs/saved.py reads back into the same runs.
  JSON keeps no field references, so each variant also lists the fields
  that follow those it sets (data.synthetic.image_size after
  data.image_size)."""
  tree = config_rules.as_json(config)
  base = config_rules.flatten(config_rules.as_json(config.base))
  first = {one.variant: one for one in reversed(runs)}
  variants = []
  for name, fields in tree['ablate']['variants']:
    now = config_rules.flatten(config_rules.as_json(first[name].config))
    follow = {k: v for k, v in now.items() if base.get(k) != v and k not in
              fields and k not in config.ablate.seed_fields}
    variants.append([name, {**fields, **follow}])
  tree['ablate'].update(variants=variants, plan_only=False, only='')
  return tree


def slurm_script(workdir: Path, num_runs: int, gpus_per_run: int) -> str:
  """An sbatch script: a job array whose task i runs line i + 1 of
  commands.txt."""
  workdir = Path(workdir).absolute()
  commands = shlex.quote(str(workdir / COMMANDS_FILE))
  return f'''#!/bin/bash
# The ablation in {workdir} as a SLURM job array: task i trains
# the run of line i + 1 of {COMMANDS_FILE} ({num_runs} runs), then writes the
# tables from the runs finished so far. Fill in the placeholders for your
# cluster (a line starting with '##' is off), then submit it:
#   sbatch {shlex.quote(str(workdir / SLURM_FILE))}
#SBATCH --job-name=ablate_{workdir.name}
#SBATCH --array=0-{num_runs - 1}
#SBATCH --ntasks=1
#SBATCH --gres=gpu:{gpus_per_run}
#SBATCH --output={workdir}/slurm-%A_%a.out
##SBATCH --partition=PARTITION
##SBATCH --time=HH:MM:SS
##SBATCH --cpus-per-task=8
##SBATCH --mem=32G
# At most K tasks at a time: --array=0-{num_runs - 1}%K. Some clusters ask
# for GPUs with --gpus-per-task={gpus_per_run} instead of --gres.
set -euo pipefail
line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {commands})
eval "$line"
'''


def _plan_message(workdir: Path, num_runs: int, collect: str) -> str:
  """How to run the planned tasks, and to write the tables afterwards."""
  commands = shlex.quote(str(workdir / COMMANDS_FILE))
  return (f'{num_runs} runs planned as tasks; nothing trained.\n'
          f'  {workdir / COMMANDS_FILE}: one command line per run, to run '
          f'from any folder; with GNU parallel, for instance:\n'
          f'    parallel -j 4 < {commands}\n'
          f'  {workdir / SLURM_FILE}: a SLURM job array of them; fill in '
          f'its #SBATCH placeholders, then:\n'
          f'    sbatch {shlex.quote(str(workdir / SLURM_FILE))}\n'
          'Each task writes the tables as it ends; to write them from '
          'whatever has finished:\n'
          f'    {collect}')


def write_plan(workdir: Path, config: ml_collections.ConfigDict,
               runs: list[Run], chosen: list[Run],
               config_args: list[str] | None) -> list[str]:
  """commands.txt (a line per chosen run, seed by seed) and
  slurm_array.sh in workdir, and how to use them; returns the lines.
  config_args: the --config flags that make config; None: it is saved
  as plan_config.json, which configs/saved.py reads."""
  workdir = Path(workdir)
  if config_args is None:
    saved = workdir / PLAN_CONFIG
    files.write_json(saved, saved_ablation(config, runs))
    config_args = [f'--config={SAVED_CONFIG}:'
                   f'{saved.absolute()}']
  seeds = list(config.ablate.seeds)
  chosen = sorted(chosen, key=lambda one: seeds.index(one.seed))
  lines = [command_line(config_args, workdir,
                        f'--config.ablate.only={one.name}')
           for one in chosen]
  files.write_text(workdir / COMMANDS_FILE, ''.join(f'{line}\n'
                                                    for line in lines))
  files.write_text(workdir / SLURM_FILE, slurm_script(
      workdir, len(lines), config.ablate.devices_per_run))
  collect = command_line(config_args, workdir,
                         '--config.ablate.collect_only=True')
  print(_plan_message(Path(workdir).absolute(), len(lines), collect),
        flush=True)
  return lines
