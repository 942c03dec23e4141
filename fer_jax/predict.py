"""--mode=predict: expressions and valence/arousal of the faces in image
files, videos or a folder of both.

Each image, or every predict.video_every-th frame of a video, goes to the
face detector (predict.detector; 'none' when the inputs are face crops
already, as AffectNet's are); each face is cut as the run's face contract
says (face_contract.py: like the training faces, in their colour, at
data.image_size; the `framing` column says how) and the crops go through
the model in batches. Finding, cutting and classifying
faces is fer_jax.Recognizer's code (recognizer.py), so the Python API and
this mode give the same numbers.
predictions.csv has one row per face, written as the faces are classified
(memory does not grow with the input); skipped.csv names every input that
gave none, with the reason; with predict.save_crops, crops/ holds each
face as the model saw it. All go to report/predict/<input>-step<N>
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
  """predictions.csv's columns: one probability per class of the run. The
  crop column is there with predict.save_crops off too (empty), so that
  the header does not change with a flag."""
  return ['path', 'frame', 'time_s', 'face', 'track', 'x', 'y', 'w', 'h',
          'score', 'framing', 'expression_id', 'expression',
          *(f'prob_{name}' for name in classes), 'valence', 'arousal',
          'crop']


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
                detector: Callable | None, tally: Tally,
                contract: dict | None = None) -> Iterator[Crop]:
  """The faces of one image file; the reason in tally if none."""
  try:
    crops = recognizer.file_crops(path, config, detector, contract)
  except (ValueError, OSError) as e:
    _skip(tally, path, str(e))
    return
  tally.frames += 1
  if not crops:
    _skip(tally, path, f'{path}: no face found ({_detector_text(config)})')
  yield from crops


def video_crops(path: Path, config: ml_collections.ConfigDict,
                detector: Callable | None, tally: Tally,
                contract: dict | None = None) -> Iterator[Crop]:
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
                                                detector, every, contract):
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


def _all_crops(paths: list[Path], config, detector, tally: Tally,
               contract: dict | None = None):
  for path in tqdm(paths, unit='file', desc='predict', leave=False):
    suffix = path.suffix.lower()
    if suffix in video.SUFFIXES:
      yield from video_crops(path, config, detector, tally, contract)
    elif suffix in IMAGE_SUFFIXES:
      yield from image_crops(path, config, detector, tally, contract)
    else:
      _skip(tally, path, f'{path}: {suffix or "no suffix"} is neither an '
            f'image ({" ".join(IMAGE_SUFFIXES)}) nor a video '
            f'({" ".join(video.SUFFIXES)})')


def crop_file(crop: Crop, input_path: Path) -> str:
  """Where predict.save_crops writes crop, relative to predictions.csv:
  crops/<its input below --input>[-f<frame>]-<face>.png (unique: no image
  suffix ends in -f<frame>)."""
  tail = ('' if crop.frame is None else f'-f{crop.frame}') + f'-{crop.face}'
  return annotate.target(Path(crop.path), input_path, Path('crops'),
                         f'{tail}.png').as_posix()


def _saved(crops: Iterator[Crop], input_path: Path, folder: Path
           ) -> Iterator[Crop]:
  """crops, each written first as a PNG at folder/crop_file(crop): the
  uint8 RGB pixels the model is given."""
  for crop in crops:
    files.write_bytes(folder / crop_file(crop, input_path),
                      annotate.encode(crop.image, '.png'))
    yield crop


def _row(crop: Crop, values: np.ndarray, classes: tuple[str, ...],
         crop_path: str) -> list:
  """crop's predictions.csv row; values: its probabilities, then valence
  and arousal."""
  blank = lambda x, form: '' if x is None else form.format(x)
  label = int(values[:len(classes)].argmax())
  return [crop.path, blank(crop.frame, '{}'), blank(crop.time, '{:.3f}'),
          crop.face, blank(crop.track, '{}'),
          *(f'{v:.1f}' for v in crop.box), blank(crop.score, '{:.4f}'),
          crop.framing, label, classes[label],
          *(f'{x:.6f}' for x in values), crop_path]


def write_rows(output: Path, rec: recognizer.Recognizer,
               crops: Iterator[Crop], input_path: Path) -> int:
  """predictions.csv's rows of crops at output, written as they are
  classified (predict.smoothing: each video face's outputs averaged along
  its track on the way); the number of rows."""
  p, count = rec.config.predict, 0
  smoother = video.Smoother(p.smoothing)
  if p.save_crops:
    crops = _saved(crops, input_path, output.parent)
  with files.streamed_csv(output, header(rec.classes)) as writer:
    for crop, probs, va in rec.classify(crops):
      track = None if crop.track is None else (crop.path, crop.track)
      values = smoother.update((crop.path, crop.frame), track,
                               np.concatenate([probs, va]))
      writer.writerow(_row(crop, values, rec.classes, crop_file(
          crop, input_path) if p.save_crops else ''))
      count += 1
  return count


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
  input_name = Path(input_path).resolve().name or 'input'
  folder = workdir_lib.output_dir(
      workdir, 'predict', inference.output_name(input_name, rec.step, config))
  output = folder / 'predictions.csv'
  start = time.perf_counter()
  count = write_rows(output, rec, _all_crops(paths, config, rec.detector,
                                             tally, rec.contract),
                     Path(input_path))
  seconds = time.perf_counter() - start - rec.compile_seconds
  if tally.skipped:
    files.write_csv(folder / 'skipped.csv', ['path', 'reason'],
                    tally.skipped)
  if config.predict.annotate:
    annotate.write_all(output, Path(input_path), folder / 'annotated',
                       config.predict.video_every)
  print(f'Wrote {count} predictions ({len(paths)} inputs) to {output}\n'
        f'{tally.frames / max(seconds, 1e-9):.1f} images or frames/s, '
        f'{count / max(seconds, 1e-9):.1f} faces/s (reading, detection, '
        'cropping and the model; compilation excluded)')
  if tally.skipped:
    print(f'Skipped {len(tally.skipped)} inputs (listed in skipped.csv):')
    for _, reason in tally.skipped:
      print(f'  {reason}')
  return output
