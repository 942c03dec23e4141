"""Crash-safe files: every file a run writes is replaced whole, never half.

Each write goes to a temporary file in the same folder, is flushed to disk,
then renamed over the target (os.replace, atomic on POSIX file systems): a
crash leaves the old file or the new one, never a truncated mix.
"""

import contextlib
import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np


def process_umask() -> int:
  """The process's umask, read without changing it where Linux shows it
  (/proc/self/status); elsewhere set to 0o022 and back at once. Setting
  it to 0, even for a moment, would make files that other threads create
  meanwhile writable by everyone."""
  try:
    for line in Path('/proc/self/status').read_text().splitlines():
      if line.startswith('Umask:'):
        return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


# Files get the usual permissions (mkstemp's would be owner-only).
_UMASK = process_umask()


def _temporary(path: Path, suffix: str) -> tuple[int, str]:
  """An open handle and the name of a new file beside path
  (.<name>.<random><suffix>), with the usual permissions; creates the
  folder."""
  path.parent.mkdir(parents=True, exist_ok=True)
  handle, temporary = tempfile.mkstemp(dir=path.parent,
                                       prefix=f'.{path.name}.', suffix=suffix)
  os.fchmod(handle, 0o666 & ~_UMASK)
  return handle, temporary


def _written(path: Path, data: bytes, suffix: str) -> str:
  """A temporary file beside path holding data, on disk."""
  handle, temporary = _temporary(path, suffix)
  try:
    with os.fdopen(handle, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
  except BaseException:
    Path(temporary).unlink(missing_ok=True)
    raise
  return temporary


def write_bytes(path: Path, data: bytes) -> None:
  """Writes data to path atomically, creating the folder."""
  path = Path(path)
  temporary = _written(path, data, '.tmp')
  try:
    os.replace(temporary, path)
  except BaseException:
    Path(temporary).unlink(missing_ok=True)
    raise


def create_new(path: Path, data: bytes) -> bool:
  """Writes data to path whole if no file is there, in one step; False if
  one is. A hard link of a complete file: readers never see it half
  written, and link() is exclusive on NFS too, where O_EXCL may not be.
  Its temporary file is not a .tmp: training's remove_leftovers would take
  it from under another process's lock attempt."""
  path = Path(path)
  temporary = _written(path, data, '.new')
  try:
    os.link(temporary, path)
    return True
  except FileExistsError:
    return False
  finally:
    Path(temporary).unlink(missing_ok=True)


def remove_leftovers(folder: Path) -> list[Path]:
  """Removes the temporary files that writes killed midway left in folder
  (.<name>.<random>.tmp, not below it); returns them."""
  found = sorted(p for p in Path(folder).glob('.*.tmp') if p.is_file())
  for path in found:
    path.unlink(missing_ok=True)
  return found


def write_text(path: Path, text: str) -> None:
  write_bytes(path, text.encode())


def write_json(path: Path, data) -> None:
  """data as indented JSON."""
  write_text(path, json.dumps(data, indent=1) + '\n')


def write_csv(path: Path, header: list[str], rows: list) -> None:
  """rows (lists, or dicts keyed by header) under a header line."""
  buffer = io.StringIO(newline='')
  if rows and isinstance(rows[0], dict):
    writer = csv.DictWriter(buffer, header)
    writer.writeheader()
  else:
    writer = csv.writer(buffer)
    writer.writerow(header)
  writer.writerows(rows)
  write_text(path, buffer.getvalue())


@contextlib.contextmanager
def streamed_csv(path: Path, header: list[str]) -> Iterator:
  """A csv.writer whose rows go, a line at a time, to a temporary file
  beside path (.<name>.<random>.tmp) that replaces path when the block
  ends; removed if the block raises."""
  path = Path(path)
  handle, temporary = _temporary(path, '.tmp')
  try:
    with os.fdopen(handle, 'w', buffering=1, newline='') as f:
      writer = csv.writer(f)
      writer.writerow(header)
      yield writer
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException:
    Path(temporary).unlink(missing_ok=True)
    raise


def write_npz(path: Path, **arrays: np.ndarray) -> None:
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **arrays)
  write_bytes(path, buffer.getvalue())


def read_jsonl(path: Path) -> list[dict]:
  """The records of a JSON-lines file; [] if it does not exist."""
  path = Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line]


def write_jsonl(path: Path, records: list[dict]) -> None:
  write_text(path, ''.join(json.dumps(r) + '\n' for r in records))


def append_jsonl(path: Path, record: dict) -> None:
  """Adds a line by rewriting the file whole (these files stay small)."""
  write_jsonl(path, [*read_jsonl(path), record])
