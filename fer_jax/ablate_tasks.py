"""An ablation's runs as tasks: which of them to train (ablate.only), one
command line per run for a scheduler (ablate.plan_only), and the processes
that train them, one at a time or ablate.parallel_runs at once on one
host, each on GPUs of its own. A process trains a run only while it holds
the run folder's lock (run_lock.py)."""

import ctypes
import dataclasses
import datetime
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import ml_collections

from fer_jax import config_rules, files, run_lock, workdir as workdir_lib
from fer_jax.config_rules import UsageError

PACKAGE = Path(__file__).resolve().parent
COMMANDS_FILE = 'commands.txt'
SLURM_FILE = 'slurm_array.sh'
# A plan made from Python (no config file to name): the ablation's config,
# which its command lines read with configs/saved.py.
PLAN_CONFIG = 'plan_config.json'
# The task lines set these themselves.
TASK_FIELDS = ('ablate.plan_only', 'ablate.only')
# How often parallel runs are looked at: runs take minutes to hours.
POLL_SECONDS = 1.0
ERROR_TAIL_BYTES = 1 << 16  # the end of a failed run's output, in error.txt
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None) if sys.platform.startswith('linux') else None


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


def visible_gpus() -> list[str]:
  """The NVIDIA GPUs this process sees, as CUDA_VISIBLE_DEVICES names them
  (its entries where it is set, else 0..N-1 from the driver); [] on a host
  without, or where JAX_PLATFORMS leaves CUDA out."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms and not any(p in platforms for p in ('cuda', 'gpu')):
    return []
  given = os.environ.get('CUDA_VISIBLE_DEVICES')
  if given is None:
    driver = Path('/proc/driver/nvidia/gpus')
    return ([str(i) for i in range(len(list(driver.iterdir())))]
            if driver.is_dir() else [])
  gpus = []
  for name in (part.strip() for part in given.split(',')):
    if not name or name.startswith('-'):  # CUDA stops at such an entry
      break
    gpus.append(name)
  return gpus


def device_slots(ablate: ml_collections.ConfigDict, num_runs: int,
                 gpus: list[str]) -> list[str | None]:
  """The devices of each of the runs trained at once: a CUDA_VISIBLE_DEVICES
  value, or None (every device for one run at a time; the CPU's cores,
  shared, for several). Refuses more GPUs than gpus, in one line."""
  at_once = max(1, min(ablate.parallel_runs, num_runs))
  if at_once == 1 or not gpus:
    return [None] * at_once
  per_run = ablate.devices_per_run
  if at_once * per_run > len(gpus):
    raise UsageError(
        f'ablate.parallel_runs={ablate.parallel_runs} x ablate.devices_per_'
        f'run={per_run} asks for {at_once * per_run} GPUs for {num_runs} '
        f"runs; this host has {len(gpus)} ({','.join(gpus)})")
  return [','.join(gpus[i * per_run:(i + 1) * per_run])
          for i in range(at_once)]


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


def command_line(config_args: list[str], workdir: Path, *flags: str) -> str:
  """A shell line that runs --mode=ablate with config_args and flags on
  the ablation in workdir, from any folder, with this interpreter and
  this fer_jax (installed or not)."""
  paths = [str(PACKAGE.parent)] + [os.path.abspath(p) for p in os.environ.get(
      'PYTHONPATH', '').split(os.pathsep) if p]
  return shlex.join([
      'env', f'PYTHONPATH={os.pathsep.join(dict.fromkeys(paths))}',
      sys.executable, '-m', 'fer_jax.cli', '--mode=ablate', *config_args,
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
    config_args = [f"--config={PACKAGE / 'configs' / 'saved.py'}:"
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


def child_command(one: Run, config_file: Path, compile_cache: Path | None
                  ) -> tuple[list[str], dict]:
  """The --mode=train command of a run, its config written to
  config_file, and its environment: this fer_jax on its path, the
  ablation's compilation cache unless JAX_COMPILATION_CACHE_DIR is set
  (the seeds of a variant compile the same programs)."""
  files.write_json(config_file, config_rules.as_json(one.config))
  command = [sys.executable, '-m', 'fer_jax.cli', '--mode=train',
             f"--config={PACKAGE / 'configs' / 'saved.py'}:{config_file}",
             f'--workdir={one.workdir}', '--num_processes=1']
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(PACKAGE.parent)] + [p for p in os.environ.get(
          'PYTHONPATH', '').split(os.pathsep) if p]))
  if compile_cache is not None:
    env.setdefault('JAX_COMPILATION_CACHE_DIR', str(compile_cache))
  return command, env


def ends_with_this_process() -> Callable[[], None] | None:
  """A preexec_fn that has the kernel kill the child when this process
  ends, SIGKILL included: a run must not train on once its lock's holder
  is gone (Linux; None elsewhere)."""
  if _LIBC is None:
    return None
  parent = os.getpid()

  def preexec() -> None:
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it ended before the line above
      os._exit(1)
  return preexec


def claim(one: Run, stale_hours: float) -> bool:
  """Takes the run folder's lock; False, with a line that says why, if
  another process holds it or the run finished meanwhile."""
  holder = run_lock.take(one.workdir, stale_hours)
  if holder is None and workdir_lib.test_report(one.workdir).exists():
    run_lock.release(one.workdir)
    holder = {}
  if holder is not None:
    print(f'skipped  {one.name}: ' + (run_lock.describe(holder) if holder
                                      else 'finished meanwhile'), flush=True)
  return holder is None


def _start(one: Run, devices: str | None, folder: Path,
           compile_cache: Path) -> tuple[subprocess.Popen, int]:
  """Starts a run's training, its output appended to <run>/train.log;
  (the process, where its output starts in the log)."""
  command, env = child_command(one, folder / f'{one.variant}.{one.seed}.json',
                               compile_cache)
  if devices is not None:
    env['CUDA_VISIBLE_DEVICES'] = devices
  log = one.workdir / 'train.log'
  with open(log, 'ab') as output:
    output.write(f'=== {datetime.datetime.now().astimezone():%F %T %z} on '
                 f'{socket.gethostname()}, devices: {devices or "all"} '
                 '===\n'.encode())
    output.flush()
    process = subprocess.Popen(command, stdout=output,
                               stderr=subprocess.STDOUT, env=env,
                               preexec_fn=ends_with_this_process())
    start = output.tell()
  print(f'started  {one.name}' + (f' on GPUs {devices}' if devices else '')
        + f'; its output: {log}', flush=True)
  return process, start


def _ended(one: Run, returncode: int, start: int, metric: str,
           seconds: float) -> None:
  """The terminal line of a run that ended; error.txt if it failed."""
  error_file, log = one.workdir / 'error.txt', one.workdir / 'train.log'
  report = workdir_lib.test_report(one.workdir)
  if returncode == 0 and report.exists():
    error_file.unlink(missing_ok=True)
    value = json.loads(report.read_text()).get(metric)
    shown = f'{value:.4f}' if isinstance(value, (int, float)) else value
    print(f'finished {one.name}: {metric} {shown} ({seconds / 60:.1f} min)',
          flush=True)
    return
  with open(log, 'rb') as f:
    f.seek(max(start, f.seek(0, os.SEEK_END) - ERROR_TAIL_BYTES))
    tail = f.read().decode(errors='replace')
  files.write_text(error_file, tail)
  last = ([line for line in tail.splitlines() if line.strip()] or [''])[-1]
  print(f'failed   {one.name} (exit code {returncode}): {last.strip()}; '
        f'its output: {log}', flush=True)


def _stop(running: dict) -> None:
  """Kills every child (Ctrl-C has reached them too) and frees its run."""
  for process in running:
    process.kill()
  for process, (one, *_) in running.items():
    process.wait()
    run_lock.release(one.workdir)
    print(f'stopped  {one.name}; running the ablation again resumes it',
          flush=True)


def train_parallel(runs: list[Run], slots: list[str | None],
                   compile_cache: Path, stale_hours: float,
                   metric: str) -> None:
  """Trains runs len(slots) at a time, each with a slot's devices, its
  output in <run>/train.log; a terminal line as each starts and ends.
  Ctrl-C stops them all."""
  waiting, running, free = list(runs), {}, list(slots)
  with tempfile.TemporaryDirectory() as folder:
    try:
      while waiting or running:
        while waiting and free:
          one = waiting.pop(0)
          if not claim(one, stale_hours):
            continue
          try:
            process, start = _start(one, free[0], Path(folder), compile_cache)
          except BaseException:
            run_lock.release(one.workdir)
            raise
          running[process] = (one, free.pop(0), start, time.perf_counter())
        for process in [p for p in running if p.poll() is not None]:
          one, slot, start, began = running.pop(process)
          free.append(slot)
          run_lock.release(one.workdir)
          _ended(one, process.returncode, start, metric,
                 time.perf_counter() - began)
        if running:
          time.sleep(POLL_SECONDS)
    except BaseException:  # Ctrl-C, SIGTERM: no run trains on
      _stop(running)
      raise
