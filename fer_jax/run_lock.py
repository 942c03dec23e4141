"""One owner per run folder: the lock a process holds while it trains a run.

The lock is <run>/lock.json, created exclusively (files.create_new), with
the holder's host, PID and start time. Its holder refreshes the file's
modification time every few minutes, so a lock's age is the time since its
holder was last heard of. A lock is stale, and taken over with a warning,
when its process has ended (same host: the PID is gone, or now belongs to
a process started later) or, held from another host, when it has not been
refreshed for `stale_hours`.
"""

import datetime
import json
import os
import socket
import threading
import time
from pathlib import Path

from absl import logging

from fer_jax import files

LOCK_FILE = 'lock.json'
# How often a holder refreshes its locks; stale_hours must be well above.
REFRESH_SECONDS = 300

_held: dict[Path, str] = {}  # lock path -> the text this process wrote
_held_guard = threading.Lock()
_refresher: threading.Thread | None = None


def _start_ticks(pid: int) -> int | None:
  """When the process started, in clock ticks since boot (Linux's
  /proc/<pid>/stat); None where unreadable."""
  try:
    stat = Path(f'/proc/{pid}/stat').read_text()
  except OSError:
    return None
  return int(stat.rsplit(')', 1)[1].split()[19])


def _record() -> dict:
  """This process as a lock holder."""
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'start_time': datetime.datetime.now().astimezone().isoformat(
              timespec='seconds'),
          'pid_start_ticks': _start_ticks(os.getpid())}


def describe(holder: dict) -> str:
  """'in progress on HOST (pid P)'."""
  return (f"in progress on {holder.get('host', 'another host')} "
          f"(pid {holder.get('pid', '?')})")


def _alive(holder: dict) -> bool:
  """Whether the holder's process (on this host) still runs."""
  pid = holder.get('pid')
  if not isinstance(pid, int) or pid <= 0:
    return False
  if pid == os.getpid():  # held by this process, or by one before it here
    with _held_guard:
      return holder in [json.loads(text) for text in _held.values()]
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    pass
  ticks = holder.get('pid_start_ticks')
  # A PID is reused: the process there now may not be the holder.
  return ticks is None or _start_ticks(pid) in (None, ticks)


def stale_reason(holder: dict, age_hours: float, stale_hours: float
                 ) -> str | None:
  """Why a lock is stale, or None while its holder may still train."""
  if holder.get('host') == socket.gethostname():
    return None if _alive(holder) else (
        f"its process {holder.get('pid')} on this host has ended")
  if age_hours > stale_hours:
    return (f'it has not been refreshed for {age_hours:.1f} h '
            f'(ablate.stale_lock_hours={stale_hours:g})')
  return None


def _read(path: Path) -> tuple[str, dict, float] | None:
  """(text, holder, age in hours) of the lock at path; None if there is
  none. Unreadable content reads as a holder of no host or PID."""
  try:
    text = path.read_text()
    age = (time.time() - path.stat().st_mtime) / 3600
  except FileNotFoundError:
    return None
  try:
    holder = json.loads(text)
  except ValueError:
    holder = {}
  return text, holder if isinstance(holder, dict) else {}, age


def holder(folder: Path, stale_hours: float) -> dict | None:
  """The process that holds folder's lock and may still train; None if no
  one does."""
  found = _read(Path(folder) / LOCK_FILE)
  if found is None or stale_reason(found[1], found[2], stale_hours):
    return None
  return found[1]


def _set_aside(path: Path, text: str) -> bool:
  """Removes the lock at path if it is still the one read as text; whether
  it was. Moved aside first, in one step: of two processes taking over the
  same stale lock, one moves it; the other then moves the first one's
  fresh lock, sees that it is not the stale one, and puts it back."""
  aside = path.with_name(f'.{path.name}.{socket.gethostname()}.'
                         f'{os.getpid()}.stale')
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return False
  stale = aside.read_text() == text
  if not stale:
    try:
      os.link(aside, path)
    except FileExistsError:
      pass
  aside.unlink()
  return stale


def take(folder: Path, stale_hours: float) -> dict | None:
  """None once this process holds folder's lock; else the holder that
  keeps it. A stale lock is taken over with a warning."""
  path = Path(folder) / LOCK_FILE
  text = json.dumps(_record()) + '\n'
  for _ in range(3):  # a stale lock set aside, then a free one taken
    if files.create_new(path, text.encode()):
      with _held_guard:
        _held[path] = text
      _refresh_while_held()
      return None
    found = _read(path)
    if found is None:
      continue
    old_text, old, age = found
    reason = stale_reason(old, age, stale_hours)
    if reason is None:
      return old
    if _set_aside(path, old_text):
      logging.warning('%s: taking over the lock of %s (pid %s, since %s): '
                      '%s', folder, old.get('host'), old.get('pid'),
                      old.get('start_time'), reason)
  found = _read(path)
  return found[1] if found else {}


def release(folder: Path) -> None:
  """Removes folder's lock if this process holds it."""
  path = Path(folder) / LOCK_FILE
  with _held_guard:
    text = _held.pop(path, None)
  found = _read(path)
  if text is not None and found is not None and found[0] == text:
    path.unlink(missing_ok=True)


def refresh_held() -> None:
  """Sets the modification time of every lock this process holds to now."""
  with _held_guard:
    paths = list(_held)
  for path in paths:
    try:
      os.utime(path)
    except OSError:  # released meanwhile, or taken over
      pass


def _refresh_while_held() -> None:
  """Starts the thread that refreshes this process's locks, once."""
  global _refresher
  with _held_guard:
    if _refresher is not None:
      return
    _refresher = threading.Thread(target=_refresh_forever, daemon=True,
                                  name='run_lock.refresh')
  _refresher.start()


def _refresh_forever() -> None:
  while True:
    time.sleep(REFRESH_SECONDS)
    refresh_held()

