"""Annotated images and videos for --mode=predict (predict.annotate): each
face's box, expression and probability, and its valence/arousal as a dot
in a small square (valence left to right, arousal bottom to top)."""

import itertools
import os
from pathlib import Path

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


def encode_jpeg(image: np.ndarray) -> bytes:
  """RGB image as JPEG bytes."""
  ok, data = cv2.imencode('.jpg', cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                          [cv2.IMWRITE_JPEG_QUALITY, 90])
  if not ok:
    raise ValueError('OpenCV could not encode an annotated image')
  return data.tobytes()


def _face(row: dict) -> dict:
  """draw's face of a predictions.csv row."""
  name = row['expression']
  return {'box': [float(row[k]) for k in 'xywh'], 'expression': name,
          'probability': float(row[f'prob_{name}']),
          'valence': float(row['valence']),
          'arousal': float(row['arousal'])}


def _target(path: Path, input_path: Path, folder: Path, suffix: str) -> Path:
  """folder/<path relative to the input folder><suffix>."""
  relative = (path.relative_to(input_path) if input_path.is_dir()
              else Path(path.name))
  return folder / f'{relative}{suffix}'


def write_all(rows: list[dict], input_path: Path, folder: Path,
              every: int) -> None:
  """Every input with a face, annotated under folder: images as JPEG,
  videos (their processed frames, at the rate they were taken) as MP4."""
  for path, group in itertools.groupby(rows, key=lambda r: r['path']):
    group, path = list(group), Path(path)
    if group[0]['frame'] == '':
      image = images.decode(path.read_bytes(), str(path), orient=True)
      files.write_bytes(_target(path, input_path, folder, '.jpg'),
                        encode_jpeg(draw(image, [_face(r) for r in group])))
    else:
      _write_video(path, _target(path, input_path, folder, '.mp4'), group,
                   every)


def _write_video(path: Path, target: Path, rows: list[dict],
                 every: int) -> None:
  """The processed frames of video path with their faces drawn."""
  by_frame = {}
  for row in rows:
    by_frame.setdefault(int(row['frame']), []).append(_face(row))
  capture, fps, _ = video.open_video(str(path))
  rate = video.processed_rate([(int(r['frame']), float(r['time_s']))
                               for r in rows if r.get('time_s')], every, fps)
  target.parent.mkdir(parents=True, exist_ok=True)
  temporary = target.with_name(f'.{target.name}.tmp.mp4')
  out = None
  try:
    for index, _, frame in video.frames(capture, fps, every):
      if out is None:
        out = video.writer(temporary, rate,
                           (frame.shape[1], frame.shape[0]))
      image = draw(frame, by_frame.get(index, []))
      out.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if out is not None:
      out.release()
      os.replace(temporary, target)
  finally:
    capture.release()
    if out is not None:  # closed before its file goes, even on an error
      out.release()
    temporary.unlink(missing_ok=True)
