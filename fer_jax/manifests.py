"""Checksums of checkpoints: each one's manifests, and their check.

Once Orbax has committed a checkpoint, every process writes
`manifest.<process>.json` into its folder: the number of processes, and
the size and SHA-256 of each file that process wrote (its own
`ocdbt.process_<i>` and `process_<i>` files; process 0 every other file,
Orbax's records included). A checkpoint is sound when every file that its
manifests list has that size and digest.

`manifests.json` in the checkpoints folder holds the first step of the run
saved with manifests, written before that checkpoint. From that step on a
checkpoint without all its manifests is incomplete (a crash came between
Orbax's commit and a manifest). Checkpoints without manifests in a folder
without that file, or before its step, were saved by a fer_jax that wrote
none: they are read unchecked, with one warning per folder.
"""

import hashlib
import json
import re
from pathlib import Path, PurePosixPath

from absl import logging

from fer_jax import files
from fer_jax.errors import DataError, describe


class DamagedCheckpoint(DataError):
  """A checkpoint whose files are not the ones its manifests record."""


MANIFEST = 'manifest.{}.json'
MARKER = 'manifests.json'  # in the checkpoints folder: {'from_step': N}
# The manifests, and the temporary files of their atomic writes.
_MANIFEST_NAME = re.compile(r'\.?manifest\.\d+\.json(\..*\.tmp)?')
# The folders and files Orbax writes in one process: ocdbt.process_<i>
# (arrays), process_<i> (array metadata).
_PROCESS_PART = re.compile(r'(?:ocdbt\.)?process_(\d+)')


def writer_of(relative: PurePosixPath) -> int:
  """The process that wrote a checkpoint's file (relative to its folder)."""
  for part in relative.parts:
    match = _PROCESS_PART.fullmatch(part)
    if match:
      return int(match.group(1))
  return 0


def _checkpoint_files(folder: Path) -> list[PurePosixPath]:
  """Every file below folder, relative to it, the manifests aside."""
  found = (PurePosixPath(p.relative_to(folder).as_posix())
           for p in folder.rglob('*') if p.is_file())
  return sorted(p for p in found if not (
      len(p.parts) == 1 and _MANIFEST_NAME.fullmatch(p.name)))


def _sha256(path: Path) -> str:
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def write(folder: Path, process: int, processes: int) -> None:
  """Writes folder/manifest.<process>.json: the size and SHA-256 of each
  file of the checkpoint in folder that process wrote."""
  listed = {str(p): {'bytes': (folder / p).stat().st_size,
                     'sha256': _sha256(folder / p)}
            for p in _checkpoint_files(folder) if writer_of(p) == process}
  files.write_json(folder / MANIFEST.format(process), {
      'process': process, 'processes': processes, 'algorithm': 'sha256',
      'files': listed})


def mark(directory: Path, step: int) -> None:
  """Records step as the first with manifests in the checkpoints folder
  directory, unless an earlier one is recorded."""
  if not (directory / MARKER).exists():
    files.write_json(directory / MARKER, {'from_step': step})


def _first_step(directory: Path) -> int | None:
  """The first step of the run saved with manifests; None where the run
  never wrote any; 0 where the marker is unreadable, so that every
  checkpoint needs its manifests."""
  path = directory / MARKER
  if not path.exists():
    return None
  try:
    return int(json.loads(path.read_text())['from_step'])
  except (ValueError, KeyError, TypeError) as e:
    logging.warning('%s is unreadable (%s): every checkpoint needs its '
                    'manifests', path, describe(e, 200))
    return 0


def _read(folder: Path, process: int, why: str
          ) -> tuple[int, dict[str, tuple[int, str]]]:
  """(number of processes, {file: (bytes, SHA-256)}) of folder's
  manifest.<process>.json; DamagedCheckpoint when it is unreadable, or
  missing (why: why it should be there)."""
  name = MANIFEST.format(process)
  if not (folder / name).exists():
    raise DamagedCheckpoint(f'{folder}: {name} is missing, so the '
                            f'checkpoint is incomplete ({why})')
  try:
    manifest = json.loads((folder / name).read_text())
    listed = {str(path): (int(entry['bytes']), str(entry['sha256']))
              for path, entry in manifest['files'].items()}
    return int(manifest['processes']), listed
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise DamagedCheckpoint(f'{folder}: {name} is unreadable '
                            f'({describe(e, 200)})') from None


def _check_file(folder: Path, relative: str, expected: tuple[int, str],
                manifest: str) -> None:
  """DamagedCheckpoint unless folder/relative has the size and SHA-256
  that manifest records."""
  path = folder / relative
  if not path.is_file():
    raise DamagedCheckpoint(f'{folder}: {relative} is missing ({manifest} '
                            'lists it)')
  size = path.stat().st_size
  if size != expected[0]:
    raise DamagedCheckpoint(f'{folder}: {relative} is damaged: {size} '
                            f'bytes, {manifest} records {expected[0]}')
  if _sha256(path) != expected[1]:
    raise DamagedCheckpoint(f'{folder}: {relative} is damaged: its SHA-256 '
                            f'is not the one {manifest} records')


# The checkpoints folders already warned about: one warning each.
_WARNED_UNCHECKED = set()


def _check_unverifiable(folder: Path) -> None:
  """For a checkpoint saved without manifests: the folder's one warning,
  and DamagedCheckpoint if its metrics file (which Orbax reads without a
  word) is unparsable."""
  if folder.parent not in _WARNED_UNCHECKED:
    _WARNED_UNCHECKED.add(folder.parent)
    logging.warning('%s: checkpoints without manifests (saved before '
                    'fer_jax checksummed its checkpoints); step %s and any '
                    'other such are read without checking their files',
                    folder.parent, folder.name)
  metrics = folder / 'metrics' / 'metrics'
  if metrics.exists():
    try:
      json.loads(metrics.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
      raise DamagedCheckpoint(f'{folder}: metrics/metrics is unreadable '
                              f'({describe(e, 200)})') from None


def check(directory: Path, step: int, item: str | None = None) -> None:
  """Checks every file of the checkpoint directory/step (or of one of its
  items) against its manifests; DamagedCheckpoint names the first that
  differs or is missing."""
  folder = directory / str(step)
  first = _first_step(directory)
  if not (folder / MANIFEST.format(0)).exists() and (
      first is None or step < first):
    _check_unverifiable(folder)
    return
  processes, listed = _read(folder, 0, f'{MARKER} says this run writes '
                            f'one with each checkpoint from step {first} on')
  every = [listed] + [_read(folder, p, f'{MANIFEST.format(0)} records '
                            f'{processes} processes')[1]
                      for p in range(1, processes)]
  for process, listed in enumerate(every):
    for relative, expected in sorted(listed.items()):
      if item is None or relative.startswith(f'{item}/'):
        _check_file(folder, relative, expected, MANIFEST.format(process))
