"""Annotated images and videos for --mode=predict (predict.annotate): each
face's box, expression and probability, and its valence/arousal as a dot
in a small square (valence left to right, arousal bottom to top)."""

import csv
import itertools
import os
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from fer_jax import files, video
from fer_jax.data import images
from fer_jax.labels import EXPRESSIONS

# RGB, one per expression (in EXPRESSIONS' order), told apart on photos.
COLOURS = ((200, 200, 200), (255, 215, 0), (70, 130, 255), (255, 140, 0),
           (160, 32, 240), (50, 205, 50), (255, 40, 40), (0, 206, 209))


def draw(image: np.ndarray, faces: list[dict]) -> np.ndarray:
  """A copy of RGB image with faces drawn; each face a dict with box
  (x, y, w, h), expression (a name), probability, valence and arousal."""
  image = image.copy()
  scale = max(image.shape[:2]) / 640
  thick = max(1, round(2 * scale))
  for face in faces:
    x, y, w, h = (int(round(v)) for v in face['box'])
    colour = COLOURS[EXPRESSIONS.index(face['expression'])]
    cv2.rectangle(image, (x, y), (x + w, y + h), colour, thick)
    text = f"{face['expression']} {face['probability']:.2f}"
    font = 0.5 * scale + 0.2
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font,
                                     thick)
    top = max(y - th - base - 2 * thick, 0)
    cv2.rectangle(image, (x, top), (x + tw + 2 * thick, top + th + base +
                                    2 * thick), colour, cv2.FILLED)
    cv2.putText(image, text, (x + thick, top + th + thick),
                cv2.FONT_HERSHEY_SIMPLEX, font, (0, 0, 0), thick,
                cv2.LINE_AA)
    _va_marker(image, x + w + thick, y, max(int(min(w, h) * 0.3), 16),
               face['valence'], face['arousal'], colour)
  return image


def _va_marker(image: np.ndarray, x: int, y: int, side: int,
               valence: float, arousal: float, colour: tuple) -> None:
  """A side x side square at (x, y) with axes and a dot at (v, a)."""
  half = side // 2
  cv2.rectangle(image, (x, y), (x + side, y + side), (255, 255, 255), 1)
  cv2.line(image, (x + half, y), (x + half, y + side), (255, 255, 255), 1)
  cv2.line(image, (x, y + half), (x + side, y + half), (255, 255, 255), 1)
  dot = (x + half + int(round(np.clip(valence, -1, 1) * half)),
         y + half - int(round(np.clip(arousal, -1, 1) * half)))
  cv2.circle(image, dot, max(2, side // 8), colour, cv2.FILLED)


def encode(image: np.ndarray, suffix: str) -> bytes:
  """RGB image as the bytes of a '.jpg' (quality 90) or '.png' file."""
  quality = [cv2.IMWRITE_JPEG_QUALITY, 90] if suffix == '.jpg' else []
  ok, data = cv2.imencode(suffix, cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                          quality)
  if not ok:
    raise ValueError(f'OpenCV could not encode an image as {suffix}')
  return data.tobytes()


def _face(row: dict) -> dict:
  """draw's face of a predictions.csv row."""
  name = row['expression']
  return {'box': [float(row[k]) for k in 'xywh'], 'expression': name,
          'probability': float(row[f'prob_{name}']),
          'valence': float(row['valence']),
          'arousal': float(row['arousal'])}


def target(path: Path, input_path: Path, folder: Path, suffix: str) -> Path:
  """folder/<path relative to the input folder (or its name, for a single
  input)><suffix>."""
  relative = (path.relative_to(input_path) if input_path.is_dir()
              else Path(path.name))
  return folder / f'{relative}{suffix}'


def _rows(table: Path) -> Iterator[dict]:
  """The rows of predictions.csv table, read as they are needed."""
  with open(table, newline='') as f:
    yield from csv.DictReader(f)


def _timed_ends(table: Path) -> dict[str, list[tuple[int, float]]]:
  """Each video's first and last timed frames (index, seconds) in table."""
  ends = {}
  for row in _rows(table):
    if row['time_s']:
      timed = (int(row['frame']), float(row['time_s']))
      ends[row['path']] = [ends.get(row['path'], [timed])[0], timed]
  return ends


def write_all(table: Path, input_path: Path, folder: Path,
              every: int) -> None:
  """Every input with a face in predictions.csv table, annotated under
  folder: images as JPEG, videos (their processed frames, at the rate they
  were taken) as MP4. The rows are read from table as the frames are."""
  ends = _timed_ends(table)
  for path, group in itertools.groupby(_rows(table),
                                       key=lambda r: r['path']):
    first, path = next(group), Path(path)
    group = itertools.chain([first], group)
    if first['frame'] == '':
      image = draw(images.decode(path.read_bytes(), str(path), orient=True),
                   [_face(r) for r in group])
      files.write_bytes(target(path, input_path, folder, '.jpg'),
                        encode(image, '.jpg'))
    else:
      _write_video(path, target(path, input_path, folder, '.mp4'), group,
                   ends.get(str(path), []), every)


def _write_video(path: Path, output: Path, rows: Iterator[dict],
                 timed: list[tuple[int, float]], every: int) -> None:
  """The processed frames of video path with the faces of rows (in frame
  order) drawn; timed: its first and last timed frames."""
  by_frame = itertools.groupby(rows, key=lambda r: int(r['frame']))
  pending = next(by_frame, None)
  capture, fps, _ = video.open_video(str(path))
  rate = video.processed_rate(timed, every, fps)
  output.parent.mkdir(parents=True, exist_ok=True)
  temporary = output.with_name(f'.{output.name}.tmp.mp4')
  out = None
  try:
    for index, _, frame in video.frames(capture, fps, every):
      if out is None:
        out = video.writer(temporary, rate,
                           (frame.shape[1], frame.shape[0]))
      faces = []
      if pending is not None and pending[0] == index:
        faces = [_face(r) for r in pending[1]]
        pending = next(by_frame, None)
      image = draw(frame, faces)
      out.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if out is not None:
      out.release()
      os.replace(temporary, output)
  finally:
    capture.release()
    if out is not None:  # closed before its file goes, even on an error
      out.release()
    temporary.unlink(missing_ok=True)
