"""Several processes (hosts) in one run: set-up and the exchanges it needs.

JAX's multi-controller model: every process runs main.py, owns its local
devices, reads its own share of the data and runs the same pmapped steps,
whose collectives span all devices of all processes.
"""

import importlib.util
import json
import multiprocessing
import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


def cluster_environment() -> str | None:
  """The launcher that started this process among several, if any: the
  variables JAX's own cluster detection reads."""
  env = os.environ
  if (int(env.get('SLURM_NTASKS', '1')) > 1 and
      all(k in env for k in ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST',
                             'SLURM_PROCID', 'SLURM_LOCALID'))):
    return 'SLURM'
  mpi_size = int(env.get('OMPI_COMM_WORLD_SIZE', '1'))
  if mpi_size > 1 and 'OMPI_MCA_orte_hnp_uri' in env:
    return 'Open MPI'
  if mpi_size > 1:  # Open MPI 5 (PRRTE) no longer sets it
    raise ValueError(
        f'Open MPI started {mpi_size} processes, but JAX detects Open MPI 4 '
        'only: pass --coordinator_address=HOST:PORT (of rank 0) '
        f'--num_processes={mpi_size} --process_id=$OMPI_COMM_WORLD_RANK, or '
        '--num_processes=1 for independent runs')
  if importlib.util.find_spec('libtpu') and (
      'TPU_WORKER_HOSTNAMES' in env or os.path.exists('/dev/accel0') or
      os.path.exists('/dev/vfio/0')):
    return 'Cloud TPU'  # JAX asks the TPU metadata for the slice's hosts
  return None


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None) -> None:
  """jax.distributed.initialize from the flags, or from the environment
  under SLURM, Open MPI or on a TPU VM; nothing for a single process.

  num_processes=1 alone: one process whatever the environment says (srun
  -n 4 of four independent runs). Never in a child process (a Grain
  worker): its parent owns the devices.
  """
  if multiprocessing.parent_process() is not None or num_processes == 1:
    return
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError('--coordinator_address needs --num_processes and '
                       '--process_id')
    jax.distributed.initialize(coordinator_address, num_processes,
                               process_id)
  elif num_processes or process_id is not None:
    raise ValueError('--num_processes and --process_id need '
                     '--coordinator_address=HOST:PORT (of process 0)')
  elif launcher := cluster_environment():
    # Said first: a process started outside the launcher's steps (python
    # in an sbatch script, not srun) waits here for the others.
    logging.info('%s started several processes: jax.distributed from its '
                 'environment (--num_processes=1: one process)', launcher)
    jax.distributed.initialize()
    logging.info('%s: process %d of %d', launcher, jax.process_index(),
                 jax.process_count())


def is_primary() -> bool:
  """Process 0 writes the files: logs, TensorBoard, reports, plots."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process gets here (nothing with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def everyone(flag: bool) -> bool:
  """Whether flag is true in every process."""
  if jax.process_count() == 1:
    return flag
  return bool(np.all(multihost_utils.process_allgather(np.array(flag))))


def gather_rows(local: np.ndarray, num_rows: int) -> np.ndarray:
  """Every process's rows in process order, the first num_rows of them.

  local: this process's rows, at most ceil(num_rows / P) of them; padded
  to that length here, as the exchange needs equal shapes.
  """
  if jax.process_count() == 1:
    return local[:num_rows]
  share = -(-num_rows // jax.process_count())
  padded = np.zeros((share, *local.shape[1:]), local.dtype)
  padded[:len(local)] = local
  everyone = multihost_utils.process_allgather(padded)  # [P, share, ...]
  return np.asarray(everyone).reshape(-1, *local.shape[1:])[:num_rows]


def gather_json(value) -> list:
  """Every process's JSON-able value, in process order."""
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(
      np.array([len(data)], np.int32))).reshape(-1)
  padded = np.zeros(sizes.max(), np.uint8)
  padded[:len(data)] = data
  everyone = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(row[:n].tobytes()) for row, n in zip(everyone, sizes)]


def on_primary(fn, *args, **kwargs):
  """fn(...) in process 0 alone (None elsewhere). If it fails there (a
  full disk), every process raises at once, rather than waiting for
  process 0 in its next collective until the heartbeat timeout."""
  if jax.process_count() == 1:
    return fn(*args, **kwargs)
  result, error = None, None
  if is_primary():
    try:
      result = fn(*args, **kwargs)
    except Exception as e:  # raised below, once the others know
      error = e
  failed = multihost_utils.broadcast_one_to_all(np.array(error is not None))
  if error is not None:
    raise error
  if failed:
    raise RuntimeError(f'{fn.__name__} failed in process 0 (its log says '
                       'why)')
  return result


def primary_first(fn, *args, **kwargs):
  """fn(...) in process 0, then in the others: what process 0 writes on the
  way (the generated data set, the index cache) the others then read. If
  it fails in process 0, every process raises, rather than waiting."""
  result = on_primary(fn, *args, **kwargs)
  return fn(*args, **kwargs) if not is_primary() else result
