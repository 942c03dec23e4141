"""The processes that train an ablation's runs, each --mode=train in a
process of its own: one at a time, or ablate.parallel_runs at once on one
host, each on GPUs of its own (CUDA_VISIBLE_DEVICES) with its output in
<run>/train.log. A process trains a run only while it holds the run
folder's lock (run_lock.py), and its training ends with it."""

import ctypes
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import ml_collections

from fer_jax import config_rules, files, run_lock, workdir as workdir_lib
from fer_jax.ablate_tasks import SAVED_CONFIG, Run, python_path
from fer_jax.config_rules import UsageError

# How often parallel runs are looked at: runs take minutes to hours.
POLL_SECONDS = 1.0
ERROR_TAIL_BYTES = 1 << 16  # the end of a failed run's output, in error.txt
_PR_SET_PDEATHSIG = 1
# Looked up here: the child calls it between fork and exec.
_PRCTL = ctypes.CDLL(None).prctl if sys.platform.startswith('linux') else None


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


def child_command(one: Run, config_file: Path, compile_cache: Path | None
                  ) -> tuple[list[str], dict]:
  """The --mode=train command of a run, its config written to
  config_file, and its environment: this fer_jax on its path, the
  ablation's compilation cache unless JAX_COMPILATION_CACHE_DIR is set
  (the seeds of a variant compile the same programs)."""
  files.write_json(config_file, config_rules.as_json(one.config))
  command = [sys.executable, '-m', 'fer_jax.cli', '--mode=train',
             f'--config={SAVED_CONFIG}:{config_file}',
             f'--workdir={one.workdir}', '--num_processes=1']
  env = dict(os.environ, PYTHONPATH=python_path())
  if compile_cache is not None:
    env.setdefault('JAX_COMPILATION_CACHE_DIR', str(compile_cache))
  return command, env


def ends_with_this_process() -> Callable[[], None] | None:
  """A preexec_fn that has the kernel kill the child when this process
  ends, SIGKILL included: a run must not train on once its lock's holder
  is gone (Linux; None elsewhere)."""
  if _PRCTL is None:
    return None
  parent = os.getpid()

  def preexec() -> None:
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it ended before the line above
      os._exit(1)
  return preexec


def popen(command: list[str], **options) -> subprocess.Popen:
  """subprocess.Popen of a run's training, which ends with this process."""
  with warnings.catch_warnings():
    # JAX warns of any fork once its backend runs (in a notebook that
    # calls ablate.run, say); this child only sets its death signal, then
    # execs.
    warnings.filterwarnings('ignore', r'os\.fork\(\) was called',
                            RuntimeWarning)
    return subprocess.Popen(command, preexec_fn=ends_with_this_process(),
                            **options)


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
    process = popen(command, stdout=output, stderr=subprocess.STDOUT,
                    env=env)
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
