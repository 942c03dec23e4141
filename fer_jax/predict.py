"""--mode=predict: expressions and valence/arousal of the faces in image
files, videos or a folder of both.

Each image, or every predict.video_every-th frame of a video, goes to the
face detector (predict.detector; 'none' when the inputs are face crops
already, as AffectNet's are); each face is cropped as training crops a face
box (a square of the box's longer side enlarged by the run's
data.face_margin on every side, resized to data.image_size, RGB) and the
crops go through the model in batches. Finding, cutting and classifying
faces is fer_jax.Recognizer's code (recognizer.py), so the Python API and
this mode give the same numbers.
predictions.csv has one row per face; skipped.csv names every input that
gave none, with the reason. Both go to report/predict/<input>-step<N>
[-flip]/, beside (never over) the run's record.
"""

import dataclasses
import time
from pathlib import Path
from typing import Callable, Iterator

import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from fer_jax import (annotate, files, inference, recognizer, video,
                     workdir as workdir_lib)
from fer_jax.config_rules import UsageError
from fer_jax.data.index import IMAGE_SUFFIXES
from fer_jax.labels import EXPRESSIONS
from fer_jax.recognizer import Crop


def header(classes: tuple[str, ...] = EXPRESSIONS) -> list[str]:
  """predictions.csv's columns: one probability per class of the run."""
  return ['path', 'frame', 'time_s', 'face', 'track', 'x', 'y', 'w', 'h',
          'score', 'expression_id', 'expression',
          *(f'prob_{name}' for name in classes), 'valence', 'arousal']


@dataclasses.dataclass
class Tally:
  """What the inputs gave besides faces: the images and frames read, and
  [path, reason] of each input that gave no face."""
  frames: int = 0
  skipped: list = dataclasses.field(default_factory=list)


def list_inputs(input_path: str) -> list[Path]:
  """The file at input_path, or every file below a folder but hidden ones
  (.DS_Store, ...): each gives its faces or is named with a reason."""
  path = Path(input_path)
  if path.is_file():
    return [path]
  if path.is_dir():
    return sorted(p for p in path.rglob('*') if p.is_file() and not any(
        part.startswith('.') for part in p.relative_to(path).parts))
  raise UsageError(f'--input: {input_path} is not a file or folder')


def image_crops(path: Path, config: ml_collections.ConfigDict,
                detector: Callable | None, tally: Tally) -> Iterator[Crop]:
  """The faces of one image file; the reason in tally if none."""
  try:
    crops = recognizer.file_crops(path, config, detector)
  except (ValueError, OSError) as e:
    _skip(tally, path, str(e))
    return
  tally.frames += 1
  if not crops:
    _skip(tally, path, f'{path}: no face found ({_detector_text(config)})')
  yield from crops


def video_crops(path: Path, config: ml_collections.ConfigDict,
                detector: Callable | None, tally: Tally) -> Iterator[Crop]:
  """The faces of every predict.video_every-th frame of a video, tracked."""
  try:
    capture, fps, count = video.open_video(str(path))
  except ValueError as e:
    _skip(tally, path, str(e))
    return
  every = config.predict.video_every
  num_frames, num_faces = 0, 0
  total = -(-count // every) if count else None
  try:
    with tqdm(total=total, unit='frame', desc=path.name, leave=False) as bar:
      for _, _, crops in recognizer.frame_crops(capture, fps, path, config,
                                                detector, every):
        num_frames += 1
        num_faces += len(crops)
        tally.frames += 1
        bar.update()
        yield from crops
  finally:
    capture.release()
  if not num_frames:
    _skip(tally, path, f'{path}: no frame could be decoded')
  elif detector is not None and not num_faces:
    _skip(tally, path, f'{path}: no face found in {num_frames} frames '
          f'({_detector_text(config)})')


def _detector_text(config: ml_collections.ConfigDict) -> str:
  p = config.predict
  return (f'predict.detector={p.detector}, min_score={p.min_score}, '
          f'min_face_size={p.min_face_size}')


def _skip(tally: Tally, path: Path, reason: str) -> None:
  logging.warning('Skipping %s', reason)
  tally.skipped.append([str(path), reason])


def _all_crops(paths: list[Path], config, detector, tally: Tally):
  for path in tqdm(paths, unit='file', desc='predict', leave=False):
    suffix = path.suffix.lower()
    if suffix in video.SUFFIXES:
      yield from video_crops(path, config, detector, tally)
    elif suffix in IMAGE_SUFFIXES:
      yield from image_crops(path, config, detector, tally)
    else:
      _skip(tally, path, f'{path}: {suffix or "no suffix"} is neither an '
            f'image ({" ".join(IMAGE_SUFFIXES)}) nor a video '
            f'({" ".join(video.SUFFIXES)})')


def _rows(results: list, smoothing: float, classes: tuple[str, ...]
          ) -> list[dict]:
  """CSV rows (dicts keyed by header(classes)); with smoothing, each video
  face's outputs averaged along its track."""
  probs = np.array([p for _, p, _ in results]).reshape(-1, len(classes))
  va = np.array([v for _, _, v in results]).reshape(-1, 2)
  if smoothing:
    tracks = [(c.path, c.track) if c.track is not None else None
              for c, _, _ in results]
    probs = video.smooth(probs, tracks, smoothing)
    va = video.smooth(va, tracks, smoothing)
  blank = lambda x, form: '' if x is None else form.format(x)
  columns, rows = header(classes), []
  for (crop, _, _), p, (valence, arousal) in zip(results, probs, va):
    label = int(p.argmax())
    values = [crop.path, blank(crop.frame, '{}'), blank(crop.time, '{:.3f}'),
              crop.face, blank(crop.track, '{}'),
              *(f'{v:.1f}' for v in crop.box), blank(crop.score, '{:.4f}'),
              label, classes[label], *(f'{x:.6f}' for x in p),
              f'{valence:.6f}', f'{arousal:.6f}']
    rows.append(dict(zip(columns, values)))
  return rows


def predict(config: ml_collections.ConfigDict, workdir: str, input_path: str,
            checkpoint_step: int | None = None) -> Path:
  """Writes predictions.csv for the faces at input_path; returns its path."""
  workdir = Path(workdir)
  paths = list_inputs(input_path)
  rec = recognizer.Recognizer.from_workdir(
      workdir, checkpoint_step, config.eval.tta, config=config)
  config, tally = rec.config, Tally()
  if not paths:
    _skip(tally, Path(input_path), f'{input_path}: no images '
          f'({", ".join(IMAGE_SUFFIXES)}) or videos '
          f'({", ".join(video.SUFFIXES)}): no files at all')
  start = time.perf_counter()
  results = list(rec.classify(_all_crops(paths, config, rec.detector,
                                         tally)))
  seconds = time.perf_counter() - start - rec.compile_seconds
  classes = rec.classes
  rows = _rows(results, config.predict.smoothing, classes)
  input_name = Path(input_path).resolve().name or 'input'
  folder = workdir_lib.output_dir(
      workdir, 'predict', inference.output_name(input_name, rec.step, config))
  output = folder / 'predictions.csv'
  files.write_csv(output, header(classes), rows)
  if tally.skipped:
    files.write_csv(folder / 'skipped.csv', ['path', 'reason'],
                    tally.skipped)
  if config.predict.annotate:
    annotate.write_all(rows, Path(input_path), folder / 'annotated',
                       config.predict.video_every)
  print(f'Wrote {len(rows)} predictions ({len(paths)} inputs) to {output}\n'
        f'{tally.frames / max(seconds, 1e-9):.1f} images or frames/s, '
        f'{len(rows) / max(seconds, 1e-9):.1f} faces/s (reading, detection, '
        'cropping and the model; compilation excluded)')
  if tally.skipped:
    print(f'Skipped {len(tally.skipped)} inputs (listed in skipped.csv):')
    for _, reason in tally.skipped:
      print(f'  {reason}')
  return output
