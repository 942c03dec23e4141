"""Crash-safe files: a write either lands whole or leaves the old file."""

import json
import os
import stat

import numpy as np
import pytest

from fer_jax import files


def test_a_write_cut_short_leaves_the_old_file_whole(tmp_path, monkeypatch):
  path = tmp_path / 'report' / 'test_metrics.json'
  files.write_json(path, {'accuracy': 0.5})

  def crash(fd):
    raise KeyboardInterrupt  # the process dies with the data half on disk
  monkeypatch.setattr(os, 'fsync', crash)
  with pytest.raises(KeyboardInterrupt):
    files.write_json(path, {'accuracy': 0.9, 'more': list(range(10_000))})
  assert json.loads(path.read_text()) == {'accuracy': 0.5}
  assert os.listdir(path.parent) == ['test_metrics.json']  # no temporary
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_jsonl_csv_and_npz_round_trip(tmp_path):
  files.append_jsonl(tmp_path / 'm.jsonl', {'epoch': 1})
  files.append_jsonl(tmp_path / 'm.jsonl', {'epoch': 2})
  assert files.read_jsonl(tmp_path / 'm.jsonl') == [{'epoch': 1},
                                                    {'epoch': 2}]
  assert files.read_jsonl(tmp_path / 'none.jsonl') == []
  files.write_csv(tmp_path / 'a.csv', ['a', 'b'], [{'a': 1}, {'a': 2, 'b': 3}])
  assert (tmp_path / 'a.csv').read_text().splitlines() == ['a,b', '1,', '2,3']
  files.write_npz(tmp_path / 's.npz', paths=np.array(['x/1.jpg']))
  with np.load(tmp_path / 's.npz') as saved:
    assert saved['paths'].tolist() == ['x/1.jpg']


def test_a_streamed_csv_shows_its_rows_as_written_and_lands_whole(
    tmp_path):
  path = tmp_path / 'predictions.csv'
  files.write_csv(path, ['a'], [[0]])
  with files.streamed_csv(path, ['a', 'b']) as writer:
    writer.writerow([1, 2])
    temporary, = tmp_path.glob('.predictions.csv.*.tmp')
    assert temporary.read_text().splitlines() == ['a,b', '1,2']
    assert path.read_text().splitlines() == ['a', '0']
  assert path.read_text().splitlines() == ['a,b', '1,2']
  assert os.listdir(tmp_path) == ['predictions.csv']
  with pytest.raises(KeyboardInterrupt):
    with files.streamed_csv(path, ['c']) as writer:
      writer.writerow([3])
      raise KeyboardInterrupt
  assert path.read_text().splitlines() == ['a,b', '1,2']
  assert os.listdir(tmp_path) == ['predictions.csv']



def test_the_umask_is_read_without_being_set(monkeypatch):
  """Setting the umask to 0 to read it would let other threads create
  world-writable files meanwhile."""
  calls = []
  previous = os.umask(0o027)
  try:
    monkeypatch.setattr(os, 'umask', lambda mask: calls.append(mask) or 0)
    assert files.process_umask() == 0o027
    assert calls == []  # read from /proc/self/status, never set (Linux)
  finally:
    monkeypatch.undo()
    os.umask(previous)
