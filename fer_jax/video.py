"""Video for --mode=predict: frames read by OpenCV, faces followed from
frame to frame, and their outputs smoothed along each track."""

import math
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from fer_jax.detect import iou

SUFFIXES = ('.mp4', '.avi', '.mov', '.mkv', '.webm', '.m4v', '.mpg',
            '.mpeg', '.wmv')
# A face in the next processed frame continues a track when their boxes
# overlap by at least this much (intersection over union).
TRACK_IOU = 0.3
# Frame rates at or above this are a container's timebase (1000, 90000)
# reported as the rate, not a camera's.
MAX_FPS = 1000.0


def frame_rate(reported: float) -> float:
  """The frames per second a container reports, or 0 (unknown) for a rate
  that is not one: NaN, 0 or less, or a timebase (MAX_FPS or more)."""
  return reported if math.isfinite(reported) and 0 < reported < MAX_FPS \
      else 0.0


def open_video(path: str) -> tuple[cv2.VideoCapture, float, int]:
  """An opened capture, its frames per second (0: unknown) and frame
  count (0: unknown); ValueError naming path if OpenCV cannot open it."""
  capture = cv2.VideoCapture(path)
  if not capture.isOpened():
    capture.release()
    raise ValueError(f'{path}: cannot open video')
  count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
  return (capture, frame_rate(capture.get(cv2.CAP_PROP_FPS)),
          int(count) if math.isfinite(count) and count > 0 else 0)


def frames(capture: cv2.VideoCapture, fps: float, every: int
           ) -> Iterator[tuple[int, float | None, np.ndarray]]:
  """(frame index, time in seconds, RGB frame) of every k-th frame.

  Time is the frame's own timestamp in the container (right for phone
  videos, whose frame rate varies), else the index over the frame rate,
  else None. Frames skipped are only grabbed, not decoded into images.
  """
  index = 0
  while True:
    if index % every:
      if not capture.grab():
        return
    else:
      ok, frame = capture.read()
      if not ok:
        return
      yield index, frame_time(capture, index, fps), cv2.cvtColor(
          frame, cv2.COLOR_BGR2RGB)
    index += 1


def frame_time(capture: cv2.VideoCapture, index: int, fps: float
               ) -> float | None:
  """The time in seconds of the frame just read: its timestamp, else
  index / fps, else None."""
  msec = capture.get(cv2.CAP_PROP_POS_MSEC)
  if math.isfinite(msec) and (msec > 0 or index == 0 and msec == 0):
    return msec / 1000
  return index / fps if fps else None


def processed_rate(timed: list[tuple[int, float]], every: int,
                   fps: float) -> float:
  """The rate, per second, at which a video's processed frames (every
  k-th) were taken, for writing them back: from the first and last timed
  frames (index, seconds) in time order, else fps / every, else 25."""
  if len(timed) > 1 and timed[-1][1] > timed[0][1]:
    return (timed[-1][0] - timed[0][0]) / every / (timed[-1][1] -
                                                   timed[0][1])
  return fps / every if fps else 25.0


class Tracker:
  """Track ids for the faces of successive frames, by greedy box overlap.

  Each face takes the id of the unclaimed face of the previous processed
  frame it overlaps most (at least TRACK_IOU), best overlaps first; the
  rest start new tracks. Enough for smoothing one or a few people; not a
  re-identifying tracker (a face that leaves and returns is a new track).
  """

  def __init__(self):
    self.boxes, self.ids, self.next_id = np.zeros((0, 4)), [], 0

  def update(self, boxes: list[np.ndarray]) -> list[int]:
    """The track id of each box of the next frame."""
    ids = [-1] * len(boxes)
    pairs = sorted(((overlap, i, j) for i, box in enumerate(boxes)
                    for j, overlap in enumerate(iou(box, self.boxes))
                    if overlap >= TRACK_IOU), reverse=True)
    claimed = set()
    for _, i, j in pairs:
      if ids[i] < 0 and j not in claimed:
        ids[i] = self.ids[j]
        claimed.add(j)
    for i in range(len(ids)):
      if ids[i] < 0:
        ids[i], self.next_id = self.next_id, self.next_id + 1
    self.boxes = np.array(boxes).reshape(-1, 4)
    self.ids = ids
    return ids


class Smoother:
  """Values averaged exponentially along each track, a face at a time in
  time order: s_t = weight * s_(t-1) + (1 - weight) * v_t.

  Only the last two frames' values are kept: a track continues from the
  previous processed frame alone (Tracker), so memory does not grow with
  the video.
  """

  def __init__(self, weight: float):
    self.weight, self.frame, self.previous, self.current = weight, None, {}, {}

  def update(self, frame, track, values: np.ndarray) -> np.ndarray:
    """values smoothed along track (a hashable key; None: not smoothed),
    in frame (a hashable key of its frame; frames in order)."""
    if track is None:
      return values
    if frame != self.frame:
      self.frame, self.previous, self.current = frame, self.current, {}
    if track in self.previous:
      values = self.weight * self.previous[track] + (1 - self.weight) * values
    self.current[track] = values
    return values


def writer(path: Path, fps: float, size: tuple[int, int]) -> cv2.VideoWriter:
  """An MP4 (MPEG-4 Part 2) writer at fps; raises naming path if it
  cannot."""
  out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'mp4v'), fps,
                        size)
  if not out.isOpened():
    raise ValueError(f'{path}: OpenCV cannot write an MP4 video here')
  return out
