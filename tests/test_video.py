"""Frames, face tracks and their smoothing."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from fer_jax import files, video


def grey_video(path: Path, count: int, step: int = 30,
               size: tuple[int, int] = (64, 48)) -> Path:
  """count frames at 10 frames/s, no face: frame i all grey level step * i
  (its index, read back)."""
  out = video.writer(path, 10.0, size)
  for i in range(count):
    out.write(np.full((size[1], size[0], 3), step * i, np.uint8))
  out.release()
  return path


def test_frames_every_kth_with_times(tmp_path):
  path = grey_video(tmp_path / 'count.mp4', 7)
  capture, fps, count = video.open_video(str(path))
  got = list(video.frames(capture, fps, every=3))
  capture.release()
  assert (fps, count) == (10.0, 7)
  assert [(i, round(t, 3)) for i, t, _ in got] == [(0, 0.0), (3, 0.3),
                                                  (6, 0.6)]
  assert [int(round(frame.mean() / 30)) for _, _, frame in got] == [0, 3, 6]
  assert got[0][2].shape == (48, 64, 3)


def test_a_file_that_is_not_a_video_is_named(tmp_path):
  path = tmp_path / 'notes.mp4'
  path.write_text('not a video')
  with pytest.raises(ValueError, match='notes.mp4: cannot open video'):
    video.open_video(str(path))


def test_tracks_follow_overlapping_boxes():
  tracker = video.Tracker()
  a, b = np.array([0, 0, 10, 10.]), np.array([100, 0, 10, 10.])
  assert tracker.update([a, b]) == [0, 1]
  # Listed in the other order and moved a little: same tracks.
  assert tracker.update([b + [2, 0, 0, 0], a + [1, 1, 0, 0]]) == [1, 0]
  # One gone, one new far away, one continuing.
  assert tracker.update([np.array([300, 0, 10, 10.]), b]) == [2, 1]
  assert tracker.update([]) == []
  assert tracker.update([b]) == [3]  # a gap ends a track


def test_smoothing_is_an_exponential_average_per_track():
  """s_t = w s_(t-1) + (1 - w) v_t, written out; a track missing from the
  previous frame starts afresh (the Tracker gives it a new id anyway)."""
  smoother = video.Smoother(0.5)
  faces = [(0, 'a', 1.0), (0, 'b', 10.0), (1, 'a', 3.0), (1, None, 20.0),
           (2, 'a', 5.0), (3, 'b', 7.0)]
  got = [smoother.update(frame, track, np.array([v], np.float32))[0]
         for frame, track, v in faces]
  first = 0.5 * 1 + 0.5 * 3
  np.testing.assert_allclose(got, [1, 10, first, 20, 0.5 * first + 0.5 * 5,
                                   7])
  assert video.Smoother(0.0).update(0, 'a', np.array([4.0])) == 4.0
  # Memory: the values of two frames, however many tracks went by.
  for frame in range(1000):
    smoother.update(frame + 4, frame, np.zeros(10))
  assert len(smoother.previous) + len(smoother.current) == 2


def test_an_error_while_annotating_a_video_closes_its_writer(tmp_path,
                                                             monkeypatch):
  from fer_jax import annotate
  path = grey_video(tmp_path / 'clip.mp4', 3)
  opened = []

  def writer(*args):
    opened.append(video_writer(*args))
    return opened[-1]

  video_writer = video.writer
  monkeypatch.setattr(video, 'writer', writer)
  monkeypatch.setattr(annotate, 'draw', lambda *_: 1 / 0)
  row = {'path': str(path), 'frame': '0', 'time_s': '0.000', 'x': '1',
         'y': '1', 'w': '9', 'h': '9', 'expression': 'Happy',
         'prob_Happy': '0.9', 'valence': '0.5', 'arousal': '0.1'}
  files.write_csv(tmp_path / 'predictions.csv', list(row), [row])
  with pytest.raises(ZeroDivisionError):
    annotate.write_all(tmp_path / 'predictions.csv', path,
                       tmp_path / 'annotated', every=1)
  assert len(opened) == 1 and not opened[0].isOpened()
  assert list((tmp_path / 'annotated').iterdir()) == []


def test_a_rate_that_is_not_one_is_unknown():
  assert [video.frame_rate(r) for r in (29.97, float('nan'), 0.0, -5.0,
                                        1000.0, 90000.0)] == [
                                            29.97, 0, 0, 0, 0, 0]


class FakeCapture:
  """A phone video's capture: frames at irregular times (variable rate)."""

  def __init__(self, msec: list[float]):
    self.msec, self.position = msec, -1

  def read(self):
    ok = self.grab()
    return ok, np.zeros((4, 4, 3), np.uint8) if ok else None

  def grab(self) -> bool:
    self.position += 1
    return self.position < len(self.msec)

  def get(self, prop):
    assert prop == cv2.CAP_PROP_POS_MSEC
    return self.msec[self.position]


def test_times_are_the_frames_own_timestamps_then_index_over_rate():
  variable = [0.0, 30.0, 70.0, 100.0, 160.0, 170.0]
  got = [(i, t) for i, t, _ in video.frames(FakeCapture(variable), 30.0, 2)]
  assert got == [(0, 0.0), (2, 0.07), (4, 0.16)]  # not 2/30, 4/30
  untimed = [0.0] * 4  # a container without timestamps
  assert [t for _, t, _ in video.frames(FakeCapture(untimed), 20.0, 1)] == \
      [0.0, 0.05, 0.1, 0.15]
  assert [t for _, t, _ in video.frames(FakeCapture(untimed), 0.0, 1)] == \
      [0.0, None, None, None]


def test_annotated_videos_play_at_the_rate_the_frames_were_taken():
  # Every 3rd frame of a 30 fps video whose frames came 1/15 s apart.
  assert video.processed_rate([(0, 0.0), (3, 0.2), (9, 0.6)], 3,
                              30.0) == pytest.approx(5.0)
  assert video.processed_rate([(0, 0.0)], 3, 30.0) == 10.0
  assert video.processed_rate([], 2, 0.0) == 25.0
