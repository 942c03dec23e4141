"""The face contract: how a run's training faces were made, so that every
consumer (--mode=predict, fer_jax.Recognizer, export, a cross-dataset
evaluation) serves the model the same kind of face.

A fresh run writes face_contract.json with its record. It holds:
- geometry: 'box' (a square around an annotated face box enlarged by the
  margin: the csv layout, RAF-DB's original photos), 'dataset_crop' (the
  data set's own crops used whole: npy, folders, RAF-DB aligned, FER2013,
  FERPlus, synthetic) or 'whole' (the image as it is);
- colour: 'rgb', or 'grey' replicated to three channels (from the layout,
  or when at least GREY_SHARE of a sample of training faces are grey);
- the arithmetic (image size, resize, normalisation) and the classes;
- calibration, measured with the inference detector on a seeded sample of
  training faces: where the eyes, nose tip and mouth centre fall in them
  (a keypoint template; predict warps each face onto it, so that its
  framing does not depend on the detector's box); for 'box' sets also
  each detector's box against the annotated one (predict's fallback for
  a face without usable keypoints).

Where the detector finds a face in under MIN_FOUND_SHARE of the sample,
the contract has no template, says so, and predict uses the box
convention: a square of the detector's box (turned into the annotated
box, where measured) enlarged by the margin. Runs from before the contract have
no file and keep that convention too, with a warning.
"""

import math
from pathlib import Path

import cv2
import ml_collections
import numpy as np
from absl import logging

from fer_jax import files, labels
from fer_jax.errors import UsageError

FILE = 'face_contract.json'
VERSION = 1
GEOMETRIES = ('box', 'dataset_crop', 'whole')
COLOURS = ('rgb', 'grey')
RESIZES = ('area',)      # area averaging to shrink, bilinear to enlarge
ROLLS = ('level', 'keep')
# How predict cut one face: warped onto the template, by the box, whole.
FRAMINGS = ('aligned', 'box', 'whole')
# detect.KEYPOINTS' first four: the ears are unreliable in a tight crop.
POINTS = ('right_eye', 'left_eye', 'nose_tip', 'mouth_centre')
GREY_LAYOUTS = ('fer2013', 'ferplus')
GREY_SHARE = 0.95
COLOUR_SAMPLE = 64       # training faces looked at for colour, at least
MIN_FOUND_SHARE = 0.5
# Training faces whose eye line varies less than this (robust standard
# deviation, degrees) are upright: predict levels a turned head's roll.
LEVEL_ROLL_SPREAD = 6.0
# A tight crop is padded by this share of its side on each side (a
# detector needs context around a face) and enlarged to CALIBRATION_SIDE.
CALIBRATION_PAD = 0.5
CALIBRATION_SIDE = 256
# A box set's crop for the detector: the box with this margin.
BOX_CONTEXT_MARGIN = 0.75
CALIBRATION_MIN_SCORE = 0.5
# The sample's own random stream ('face'), apart from training's.
_STREAM = 0x66616365
# ITU-R 601 luma in integers, exact in NumPy and inside exported graphs.
LUMA_WEIGHTS = (299, 587, 114)
GREY_TOLERANCE = 2.0     # mean |R - G| + |G - B| of a grey image


def to_grey(images: np.ndarray) -> np.ndarray:
  """uint8 RGB [..., 3] as grey (ITU-R 601 luma, rounded) replicated to
  three channels; a grey image is returned unchanged."""
  x = np.asarray(images, np.int32)
  luma = (x[..., 0] * LUMA_WEIGHTS[0] + x[..., 1] * LUMA_WEIGHTS[1] +
          x[..., 2] * LUMA_WEIGHTS[2] + 500) // 1000
  return np.repeat(luma[..., None], 3, axis=-1).astype(np.uint8)


def is_grey(image: np.ndarray) -> bool:
  """Whether an RGB image's channels (nearly) agree everywhere."""
  x = np.asarray(image, np.float32)
  return float(np.abs(x[..., 0] - x[..., 1]).mean() +
               np.abs(x[..., 1] - x[..., 2]).mean()) <= GREY_TOLERANCE


def legacy(config: ml_collections.ConfigDict) -> dict:
  """The contract of a run from before contracts: the box convention, in
  colour, as fer_jax served every run then."""
  return {**_arithmetic(config), 'geometry': 'box', 'colour': 'rgb',
          'colour_source': 'not recorded', 'alignment': None,
          'box_calibration': None,
          'calibration': {'note': 'no face_contract.json: a run from before '
                                  'face contracts'}}


def imported(config: ml_collections.ConfigDict, source: str) -> dict:
  """The contract of an imported model: its published crop, a box with
  config.data.face_margin (0: tight), in colour."""
  return {**_arithmetic(config), 'geometry': 'box', 'colour': 'rgb',
          'colour_source': source, 'alignment': None,
          'box_calibration': None, 'calibration': {'note': source}}


def _arithmetic(config: ml_collections.ConfigDict) -> dict:
  d = config.data
  return {'version': VERSION, 'margin': float(d.face_margin),
          'image_size': int(d.image_size), 'resize': RESIZES[0],
          'mean_rgb': [float(v) for v in d.mean_rgb],
          'std_rgb': [float(v) for v in d.std_rgb],
          'classes': list(labels.run_classes(config))}


def describe(contract: dict) -> str:
  """How predict cuts a face for this contract, in a sentence."""
  size, margin = contract['image_size'], contract['margin']
  boxes = contract['box_calibration']
  box = (f"a square of the face box's longer side x (1 + 2 x {margin})"
         + (' (the detector\'s box turned into the annotated one: ' +
            '; '.join(f"{name}: side x {b['scale']}, centre moved by "
                      f"{b['offset']} sides" for name, b in boxes.items())
            + ')' if boxes else ''))
  alignment = contract['alignment']
  if contract['geometry'] == 'whole':
    how = 'the image as it is'
  elif alignment:
    how = ('the face warped by a similarity (least squares over the eyes, '
           'nose tip and mouth centre) onto the template ' +
           ', '.join(f'{p} {alignment["template"][p]}' for p in POINTS) +
           ' (fractions of the side)' +
           (', its roll levelled' if alignment['roll'] == 'level'
            else ', its roll kept'))
  else:
    how = box
  colour = ('grey (ITU-R 601 luma) in three channels'
            if contract['colour'] == 'grey' else 'RGB')
  return (f'{how}, resized to {size} px ({contract["resize"]} averaging to '
          f'shrink, bilinear to enlarge), {colour}')


# --- building a fresh run's contract ---------------------------------------

def sample_indices(num: int, count: int, seed: int) -> np.ndarray:
  """Up to count distinct record indices, from the sample's own stream
  (training's draws do not change)."""
  return np.random.default_rng([seed, _STREAM]).permutation(num)[:count]


def calibration_detectors(config: ml_collections.ConfigDict, every: bool
                          ) -> dict:
  """{name: function} of the detector predict uses (blazeface_full where
  predict.detector is 'none'), then, if every, the others; {name: the
  reason} where their models are not installed."""
  from fer_jax import detect  # LiteRT: only where faces are detected
  first = config.predict.detector
  first = 'blazeface_full' if first == 'none' else first
  others = [n for n in detect.MODELS if n != first] if every else []
  try:
    return {name: detect.create_detector(name, CALIBRATION_MIN_SCORE, 0.0)
            for name in (first, *others)}
  except UsageError as error:
    return {first: str(error)}


def build(config: ml_collections.ConfigDict, train, load_face,
          detectors: dict | None = None) -> dict:
  """A fresh run's contract from its training records.

  load_face(i): the base image of train record i, as training makes it.
  detectors: {name: function, or the reason there is none}, the one that
  predict uses first (the keypoint template is measured with it; a box
  set's box relation with each, as their boxes differ); None:
  calibration_detectors (every detector for a box set).
  """
  count = config.data.face_calibration_samples
  indices = sample_indices(len(train), max(count, COLOUR_SAMPLE),
                           config.train.seed)
  boxed = np.isfinite(train.boxes).all(axis=1)
  geometry = 'box' if len(train) and boxed.mean() >= 0.5 else 'dataset_crop'
  faces = [load_face(int(i)) for i in indices]
  colour, source = _colour(config.data.layout, faces)
  indices, faces = indices[:count], faces[:count]
  contract = {**_arithmetic(config), 'geometry': geometry, 'colour': colour,
              'colour_source': source, 'alignment': None,
              'box_calibration': None}
  if not count:
    detectors = {None: 'data.face_calibration_samples is 0'}
  elif detectors is None:
    detectors = calibration_detectors(config, every=geometry == 'box')
  name, detect_fn = next(iter(detectors.items()))
  if isinstance(detect_fn, str):
    contract['calibration'] = {'detector': name, 'note': 'not calibrated: '
                               + detect_fn}
    return contract
  points = [_face_points(face, detect_fn) for face in faces]
  found = sum(p is not None for p in points)
  calibration = {'detector': name, 'sampled': len(points), 'found': found}
  enough = found >= MIN_FOUND_SHARE * max(len(points), 1)
  if enough:
    contract['alignment'] = _alignment([p for p in points if p is not None])
  if geometry == 'box':
    contract['box_calibration'] = _calibrate_box(
        train, indices[boxed[indices]], detectors)
    calibration['box_found'] = {
        n: b['found'] for n, b in (contract['box_calibration'] or {}).items()}
  calibration['note'] = (
      f'{name} found a face in {found} of {len(points)} sampled training '
      'faces' + ('' if enough else
                 f' (under {MIN_FOUND_SHARE:.0%}): predict cuts faces by the '
                 'box convention, a square of the detector\'s box enlarged by '
                 'data.face_margin' + (', turned into the annotated box'
                                       if contract['box_calibration']
                                       else '')))
  contract['calibration'] = calibration
  return contract


def _calibrate_box(train, indices: np.ndarray, detectors: dict
                   ) -> dict | None:
  """{detector: its median box relation, and the faces it was found in}
  for each detector that found at least MIN_FOUND_SHARE of the sampled
  annotated faces; None if none did."""
  relations = [_box_relations(train.paths[i], train.boxes[i], detectors)
               for i in indices]
  by_name = {}
  for name in detectors:
    mine = [r[name] for r in relations if r and r[name] is not None]
    if mine and len(mine) >= MIN_FOUND_SHARE * len(relations):
      by_name[name] = {**_box_summary(mine), 'found': len(mine)}
  return by_name or None


def _colour(layout: str, faces: list[np.ndarray]) -> tuple[str, str]:
  if layout in GREY_LAYOUTS:
    return 'grey', f'the {layout} layout'
  grey = sum(map(is_grey, faces))
  text = f'{grey} of {len(faces)} sampled training faces are grey'
  return ('grey' if faces and grey >= GREY_SHARE * len(faces) else 'rgb',
          text)


def _face_points(face: np.ndarray, detect_fn) -> np.ndarray | None:
  """[4, 2] keypoints of the face in a tight crop, as fractions of its
  side; None where the detector finds none."""
  side = face.shape[0]
  pad = int(round(side * CALIBRATION_PAD))
  padded = cv2.copyMakeBorder(face, pad, pad, pad, pad, cv2.BORDER_CONSTANT,
                              value=(0, 0, 0))
  scale = CALIBRATION_SIDE / padded.shape[0]
  big = cv2.resize(padded, (CALIBRATION_SIDE, CALIBRATION_SIDE),
                   interpolation=cv2.INTER_LINEAR if scale > 1
                   else cv2.INTER_AREA)
  for found in detect_fn(big):
    points = (found.keypoints[:len(POINTS)] / scale - pad) / side
    centre = points.mean(axis=0)
    if np.all(np.isfinite(points)) and np.all((centre > 0) & (centre < 1)):
      return points
  return None


def roll_degrees(points: np.ndarray) -> np.ndarray:
  """The eye line's angle (degrees; 0: level) of keypoints [..., 4, 2]."""
  eyes = points[..., 1, :] - points[..., 0, :]
  return np.degrees(np.arctan2(eyes[..., 1], eyes[..., 0]))


def _spread(values: np.ndarray, axis: int = 0) -> np.ndarray:
  """The robust standard deviation: 1.4826 x the median absolute
  deviation."""
  median = np.median(values, axis=axis)
  return 1.4826 * np.median(np.abs(values - median), axis=axis)


def _alignment(points: list[np.ndarray]) -> dict | None:
  if not points:
    return None
  points = np.stack(points)
  template = np.median(points, axis=0)
  roll = float(_spread(roll_degrees(points)))
  spread = _spread(points)
  return {'template': {p: [round(float(v), 5) for v in template[k]]
                       for k, p in enumerate(POINTS)},
          'spread': {p: [round(float(v), 5) for v in spread[k]]
                     for k, p in enumerate(POINTS)},
          'roll_spread_degrees': round(roll, 3),
          'roll': 'level' if roll < LEVEL_ROLL_SPREAD else 'keep'}


def _box_relations(path: str, box: np.ndarray, detectors: dict
                   ) -> dict | None:
  """{detector: (annotated side / detected side, centre offset x, y in
  detected sides), or None where no detection overlaps the box} of one
  annotated face; None where the image cannot be read."""
  from fer_jax.data import images
  try:
    crop = images.load(str(path), CALIBRATION_SIDE, box, BOX_CONTEXT_MARGIN)
  except (ValueError, OSError):
    return None
  region = images.face_region(box, BOX_CONTEXT_MARGIN)
  scale = CALIBRATION_SIDE / region[2]
  x, y, w, h = box
  annotated = np.array([(x - region[0]) * scale, (y - region[1]) * scale,
                        w * scale, h * scale])
  return {name: _box_relation(annotated, detect_fn(crop))
          for name, detect_fn in detectors.items()}


def _box_relation(annotated: np.ndarray, faces: list
                  ) -> tuple[float, float, float] | None:
  """The annotated box against the detected face that overlaps it most."""
  from fer_jax.detect import iou
  if not faces:
    return None
  overlaps = iou(annotated, np.stack([f.box for f in faces]))
  if overlaps.max() <= 0:
    return None
  best = faces[int(overlaps.argmax())].box
  side = max(best[2:])
  offset = ((annotated[:2] + annotated[2:] / 2) -
            (best[:2] + best[2:] / 2)) / side
  return max(annotated[2:]) / side, float(offset[0]), float(offset[1])


def _box_summary(relations: list[tuple]) -> dict:
  scale, dx, dy = np.median(np.array(relations), axis=0)
  return {'scale': round(float(scale), 5),
          'offset': [round(float(dx), 5), round(float(dy), 5)]}


# --- reading and checking --------------------------------------------------

def write(workdir: Path, contract: dict) -> None:
  """face_contract.json of a fresh run (atomic)."""
  check(contract, Path(workdir) / FILE)
  files.write_json(Path(workdir) / FILE, contract)


def read(workdir: Path, config: ml_collections.ConfigDict) -> dict:
  """The run's contract, checked; a legacy one (with a warning) for a run
  from before contracts."""
  path = Path(workdir) / FILE
  if not path.exists():
    logging.warning('%s: no face contract (a run of an older fer_jax): '
                    'faces are cut as a square of the detector\'s box '
                    'enlarged by data.face_margin, in colour', workdir)
    return legacy(config)
  from fer_jax import workdir as workdir_lib
  contract = workdir_lib.read_json(path)
  check(contract, path)
  return contract


def _field(path, name: str, what: str) -> UsageError:
  return UsageError(f'{path}: {name}: {what}')


def _need(contract: dict, path, name: str, kinds: tuple, choices=None):
  """The value of a dotted field, of one of kinds (never a bool) and, if
  given, one of choices; UsageError naming it otherwise."""
  value = contract
  for part in name.split('.'):
    if not isinstance(value, dict) or part not in value:
      raise _field(path, name, 'missing')
    value = value[part]
  if not isinstance(value, kinds) or isinstance(value, bool):
    kind = ' or '.join(k.__name__ for k in kinds)
    raise _field(path, name, f'{value!r} is not a {kind}')
  if choices is not None and value not in choices:
    raise _field(path, name, f'{value!r} is not one of {choices}')
  return value


def _numbers(path, name: str, value, length: int) -> None:
  if not (isinstance(value, list) and len(value) == length and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) and
      math.isfinite(v) for v in value)):
    raise _field(path, name, f'{value!r} is not {length} finite numbers')


def check(contract, path) -> None:
  """UsageError naming path and the first field that is missing or has an
  unknown value."""
  if not isinstance(contract, dict):
    raise UsageError(f'{path}: not a JSON object')
  version = _need(contract, path, 'version', (int,))
  if version != VERSION:
    raise _field(path, 'version', f'{version} is not {VERSION} (a newer '
                 'fer_jax wrote it?)')
  _need(contract, path, 'geometry', (str,), GEOMETRIES)
  _need(contract, path, 'colour', (str,), COLOURS)
  _need(contract, path, 'resize', (str,), RESIZES)
  size = _need(contract, path, 'image_size', (int,))
  if size < 1:
    raise _field(path, 'image_size', f'{size} is not a positive size')
  margin = _need(contract, path, 'margin', (int, float))
  if not (math.isfinite(margin) and margin >= 0):
    raise _field(path, 'margin', f'{margin!r} is not a margin >= 0')
  for name in ('mean_rgb', 'std_rgb'):
    _numbers(path, name, _need(contract, path, name, (list,)), 3)
  if any(v <= 0 for v in contract['std_rgb']):
    raise _field(path, 'std_rgb', 'holds a value <= 0')
  classes = _need(contract, path, 'classes', (list,))
  if not classes or not all(isinstance(c, str) and c for c in classes):
    raise _field(path, 'classes', f'{classes!r} is not a list of names')
  _check_alignment(contract, path)
  _check_box_calibration(contract, path)


def _section(contract: dict, path, name: str) -> dict | None:
  """An optional section: a dict, or None (not measured); UsageError when
  the key is missing or holds something else."""
  if name not in contract:
    raise _field(path, name, 'missing')
  return None if contract[name] is None else _need(contract, path, name,
                                                    (dict,))


def _check_box_calibration(contract: dict, path) -> None:
  from fer_jax.detect import MODELS
  for name in _section(contract, path, 'box_calibration') or {}:
    if name not in MODELS:
      raise _field(path, 'box_calibration', f'{name!r} is not a detector '
                   f'({", ".join(MODELS)})')
    field = f'box_calibration.{name}'
    scale = _need(contract, path, f'{field}.scale', (int, float))
    if not (math.isfinite(scale) and scale > 0):
      raise _field(path, f'{field}.scale', f'{scale!r} is not > 0')
    _numbers(path, f'{field}.offset',
             _need(contract, path, f'{field}.offset', (list,)), 2)


def _check_alignment(contract: dict, path) -> None:
  if _section(contract, path, 'alignment') is None:
    return
  _need(contract, path, 'alignment.roll', (str,), ROLLS)
  template = _need(contract, path, 'alignment.template', (dict,))
  for point in POINTS:
    _numbers(path, f'alignment.template.{point}', template.get(point), 2)
  points = np.array([template[p] for p in POINTS])
  if np.ptp(points, axis=0).max() <= 0:
    raise _field(path, 'alignment.template', 'its points are all one spot')
