"""Transparent huge pages for XLA:CPU's buffers (main.py restarts once).

Each execution of a compiled program allocates its temporary buffer anew
(XLA:CPU's `posix_memalign`; ResNet18's default train step 190 MB,
EfficientNet-B0's at 112 px about 1 GB a step). glibc maps buffers that
large straight from the kernel and unmaps them when freed, so every step
faults its buffers in again, 4 KiB at a time, each page zeroed by the
kernel: about 49,000 faults and 110 ms of system time a step for ResNet18,
240,000 and 500 ms for EfficientNet-B0 on a 2-core AVX-512 machine
(docs/performance.md). Where transparent huge pages are given on request (the
kernel's `madvise` mode; with `always` the buffers get them anyway),
glibc 2.35 and later asks for them when `GLIBC_TUNABLES` holds
`glibc.malloc.hugetlb=1`: 2 MiB pages, a few hundred faults a step.
glibc reads the variable only as a process starts, so main.py restarts
itself with it. The arithmetic is the same; only the pages differ.
"""

import os
import sys

TUNABLE = 'glibc.malloc.hugetlb=1'
THP_ENABLED = '/sys/kernel/mm/transparent_hugepage/enabled'


def thp_mode(path: str = THP_ENABLED) -> str:
  """The kernel's transparent huge page mode ('always', 'madvise',
  'never'), or '' where it has none."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return ''
  start, end = text.find('['), text.find(']')
  return text[start + 1:end] if 0 <= start < end else ''


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the C library's glibc, or None for another libc."""
  try:
    name, version = os.confstr('CS_GNU_LIBC_VERSION').split()
    major, minor = version.split('.')[:2]
    return (int(major), int(minor)) if name == 'glibc' else None
  except (AttributeError, OSError, TypeError, ValueError):
    return None


def restart_environment(environ: dict, mode: str,
                        glibc: tuple[int, int] | None) -> dict | None:
  """The environment to restart with, or None to go on as is: glibc
  2.35+, huge pages on request only ('always' gives them anyway, 'never'
  not at all), and GLIBC_TUNABLES not set, even empty: a user's setting
  is theirs, and the restarted process has it."""
  if mode != 'madvise' or glibc is None or glibc < (2, 35):
    return None
  if 'GLIBC_TUNABLES' in environ:
    return None
  return {**environ, 'GLIBC_TUNABLES': TUNABLE}


def restart_environment_here(environ: dict) -> dict | None:
  """`restart_environment` on this machine's kernel and C library."""
  return restart_environment(environ, thp_mode(), glibc_version())


def restart_with_huge_pages() -> None:
  """Runs this command again, in this process, with `TUNABLE` set, where
  `restart_environment` says so; otherwise returns."""
  environment = restart_environment_here(dict(os.environ))
  if environment is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
              environment)
  except OSError:  # no interpreter to run again (embedded): go on as is
    return


def record() -> dict:
  """This process's page setting, for a benchmark row."""
  return {'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
          'transparent_hugepages': thp_mode()}


def describe() -> str:
  """This process's page setting, for the log."""
  pages = f'transparent huge pages {thp_mode() or "absent"}'
  tunables = os.environ.get('GLIBC_TUNABLES')
  if tunables is None:
    return f'memory pages: {pages}'
  return f'memory pages: GLIBC_TUNABLES={tunables}, {pages}'
