"""hugepages.py: main.py restarts once with glibc asking for transparent
huge pages, where the kernel gives them on request."""

import json
import os
import subprocess
import sys

import pytest

from fer_jax import hugepages
from tests.conftest import ROOT

RESTARTS = hugepages.restart_environment_here({}) is not None


@pytest.mark.parametrize('environ, mode, glibc, restarts', [
    ({'PATH': '/bin'}, 'madvise', (2, 36), True),
    ({'PATH': '/bin'}, 'madvise', (2, 35), True),
    ({'PATH': '/bin'}, 'madvise', (2, 34), False),  # no hugetlb tunable
    ({'PATH': '/bin'}, 'madvise', None, False),     # musl and others
    ({'PATH': '/bin'}, 'always', (2, 36), False),   # huge pages anyway
    ({'PATH': '/bin'}, 'never', (2, 36), False),
    ({'PATH': '/bin'}, '', (2, 36), False),
    ({'GLIBC_TUNABLES': ''}, 'madvise', (2, 36), False),  # the user's choice
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, 'madvise', (2, 36), False),
])
def test_restarts_only_where_huge_pages_come_on_request(environ, mode, glibc,
                                                        restarts):
  got = hugepages.restart_environment(environ, mode, glibc)
  if restarts:
    assert got == {**environ, 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  else:
    assert got is None


@pytest.mark.parametrize('text, mode', [
    ('always [madvise] never\n', 'madvise'),
    ('[always] madvise never\n', 'always'),
    ('always madvise [never]\n', 'never'),
    ('', ''), ('always madvise never\n', ''), ('] [\n', ''),
    (None, ''),  # no such file: a kernel without them
])
def test_thp_mode_reads_the_kernels_choice(tmp_path, text, mode):
  path = tmp_path / 'enabled'
  if text is not None:
    path.write_text(text)
  assert hugepages.thp_mode(str(path)) == mode


# Allocates 256 MiB through glibc as XLA:CPU does (posix_memalign), writes
# it and prints the minor page faults that took, and GLIBC_TUNABLES.
_FAULTS = '''
import ctypes, json, os, resource, sys
from fer_jax import hugepages
hugepages.restart_with_huge_pages()
libc = ctypes.CDLL(None)
size, pointer = 256 << 20, ctypes.c_void_p()
assert libc.posix_memalign(ctypes.byref(pointer), 64, size) == 0
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(pointer, 1, size)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps([faults, os.environ.get('GLIBC_TUNABLES', 'unset')]))
'''


def _faults(environ: dict) -> tuple[int, str]:
  done = subprocess.run([sys.executable, '-c', _FAULTS], env=environ,
                        cwd=ROOT, capture_output=True, text=True, check=True)
  faults, tunables = json.loads(done.stdout)
  return faults, tunables


def test_restarted_process_touches_big_buffers_in_huge_pages():
  """Where this machine restarts (glibc 2.35+, huge pages on request; CI's
  do), the restarted process has the tunable and glibc honours it: 256
  MiB in fewer than a tenth of its 65,536 small pages. An empty
  GLIBC_TUNABLES keeps small pages and is left as it is."""
  environ = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  small_faults, tunables = _faults({**environ, 'GLIBC_TUNABLES': ''})
  assert tunables == '' and small_faults > 0.9 * 65536
  faults, tunables = _faults(environ)
  if RESTARTS:
    assert tunables == 'glibc.malloc.hugetlb=1'
    assert faults < 0.1 * 65536, (faults, small_faults)
  else:
    assert tunables == 'unset'


def test_main_restarts_before_it_runs_and_says_so(tmp_path):
  """main.py itself restarts (the log of the restarted process names the
  tunable) and then runs as asked."""
  environ = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  done = subprocess.run(
      [sys.executable, str(ROOT / 'main.py'), '--mode=predict',
       f'--workdir={tmp_path}'], env=environ, capture_output=True, text=True)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1] == (
      '--mode=predict needs --input=PATH')
  line = next(l for l in done.stderr.splitlines() if 'memory pages:' in l)
  if RESTARTS:
    assert 'GLIBC_TUNABLES=glibc.malloc.hugetlb=1, transparent huge pages ' \
        'madvise' in line
  else:
    assert 'GLIBC_TUNABLES' not in line

