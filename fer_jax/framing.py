"""Cutting a detected face as the run's face contract says (face_contract).

Three framings, named in predictions.csv's `framing` column:
- 'aligned': the face warped onto the contract's keypoint template (where
  the training faces' eyes, nose and mouth fall, in a box set's crops
  too) by a similarity transform, fitted by least squares over the eyes, nose tip
  and mouth centre (under roll 'keep', scale and position only: the head's
  roll stays, as in the training faces);
- 'box': a square around the detector's box (turned into the box training
  would have cut, where the contract measured that for this detector, a
  function of detect.create_detector that carries its name) enlarged by
  the margin, as training cuts an annotated box; also the fallback where
  the keypoints are degenerate (NaN, or all on one spot);
- 'whole': the image as it is, resized (predict.detector='none').

Coordinates are continuous pixels: pixel i spans [i, i + 1), as the
detector reports them. A matrix maps the image's coordinates to the
crop's.
"""

from typing import Callable

import cv2
import numpy as np

from fer_jax import face_contract
from fer_jax.data import images

# Keypoints closer together than this (pixels) are one spot.
MIN_POINT_SPREAD = 1.0
# The side of the second look at an aligned face (refined): the crop in
# its middle half, the rest context.
REFINE_SIDE = 256


def fit_similarity(points: np.ndarray, target: np.ndarray,
                   rotate: bool = True) -> np.ndarray:
  """The 2x3 matrix of the similarity (rotate False: scale and shift only)
  that maps points [K, 2] closest to target [K, 2], by least squares."""
  p = points[:, 0] + 1j * points[:, 1]
  q = target[:, 0] + 1j * target[:, 1]
  pc, qc = p - p.mean(), q - q.mean()
  a = np.vdot(pc, qc) / np.vdot(pc, pc).real
  if not rotate:
    a = complex(a.real, 0.0)
  b = q.mean() - a * p.mean()
  return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


def degenerate(points: np.ndarray) -> bool:
  """Whether keypoints [K, 2] cannot place a face: not finite, or all
  within MIN_POINT_SPREAD of one spot."""
  return (not np.all(np.isfinite(points)) or
          float(np.ptp(points, axis=0).max()) < MIN_POINT_SPREAD)


def template_points(contract: dict) -> np.ndarray:
  """The contract's keypoint template [4, 2] in the crop's pixels."""
  template = contract['alignment']['template']
  return np.array([template[p] for p in face_contract.POINTS]
                  ) * contract['image_size']


def whole_matrix(width: float, height: float, size: int) -> np.ndarray:
  """The matrix of a width x height image resized to size x size."""
  return np.diag([size / width, size / height, 1.0])[:2]


def region_matrix(region: np.ndarray, size: int) -> np.ndarray:
  """The matrix of a square region (x0, y0, side) resized to size."""
  x0, y0, side = region
  scale = size / side
  return np.array([[scale, 0, -x0 * scale], [0, scale, -y0 * scale]])


def _index_matrix(matrix: np.ndarray) -> np.ndarray:
  """matrix in OpenCV's pixel indices (centres at integers)."""
  linear = matrix[:, :2]
  return np.concatenate([linear, (matrix[:, 2] + linear @ np.full(2, 0.5)
                                  - 0.5)[:, None]], axis=1)


def warp(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
  """The size x size crop that matrix maps image onto; black beyond its
  edges. A shrinking warp first area-averages the region it reads (as
  training's resize does), then warps bilinearly."""
  scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
  if scale < 1:
    inverse = cv2.invertAffineTransform(matrix)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1],
                        [size, size, 1]], float) @ inverse.T
    h, w = image.shape[:2]
    x0, y0 = np.clip(np.floor(corners.min(axis=0)), 0, (w, h)).astype(int)
    x1, y1 = np.clip(np.ceil(corners.max(axis=0)), 0, (w, h)).astype(int)
    if x1 <= x0 or y1 <= y0:
      return np.zeros((size, size, 3), np.uint8)
    region = image[y0:y1, x0:x1]
    small = cv2.resize(region, (max(1, round((x1 - x0) * scale)),
                                max(1, round((y1 - y0) * scale))),
                       interpolation=cv2.INTER_AREA)
    fx, fy = small.shape[1] / (x1 - x0), small.shape[0] / (y1 - y0)
    # small's coordinates u map to the image's as u / f + (x0, y0).
    to_image = np.array([[1 / fx, 0, x0], [0, 1 / fy, y0], [0, 0, 1]])
    image, matrix = small, matrix @ to_image
  return cv2.warpAffine(image, _index_matrix(matrix), (size, size),
                        flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def training_box(box: np.ndarray, calibration: dict | None) -> np.ndarray:
  """The box (x, y, w, h) training would have cut for a detector's box:
  the contract's box_calibration applied (a square of the detected side x
  scale, its centre moved by offset detected sides); None: box itself."""
  if calibration is None:
    return np.asarray(box, float)
  side = float(max(box[2:]))
  centre = np.asarray(box[:2], float) + np.asarray(box[2:]) / 2 + np.asarray(
      calibration['offset']) * side
  side *= calibration['scale']
  return np.array([*(centre - side / 2), side, side])


def aligned_matrix(keypoints: np.ndarray, contract: dict
                   ) -> np.ndarray | None:
  """The matrix that puts a face's keypoints [>= 4, 2] on the contract's
  template; None where the contract has none or the keypoints are
  degenerate."""
  if contract['geometry'] == 'whole' or not contract['alignment']:
    return None
  points = np.asarray(keypoints, float)[:4]
  if degenerate(points):
    return None
  return fit_similarity(points, template_points(contract),
                        rotate=contract['alignment']['roll'] == 'level')


def refined(image: np.ndarray, matrix: np.ndarray, contract: dict,
            detector: Callable) -> np.ndarray:
  """matrix fitted again to the keypoints that detector finds in the face
  as matrix frames it (upright, where the template is), with the crop's
  side of context around it: BlazeFace places a turned face's keypoints
  closer to upright than they are (a 25 degree roll read as about 20);
  the second look halves that error. matrix itself where the second look
  finds no face at the centre."""
  size = contract['image_size']
  scale = REFINE_SIDE / (2 * size)
  context = np.array([[scale, 0, REFINE_SIDE / 4],
                      [0, scale, REFINE_SIDE / 4]]) @ np.vstack(
                          [matrix, [0, 0, 1]])
  for face in detector(warp(image, context, REFINE_SIDE)):
    centre = face.box[:2] + face.box[2:] / 2
    if np.all(np.abs(centre / REFINE_SIDE - 0.5) < 0.25):
      back = cv2.invertAffineTransform(context)
      refit = aligned_matrix(face.keypoints @ back[:, :2].T + back[:, 2],
                             contract)
      return matrix if refit is None else refit
  return matrix


def cut(image: np.ndarray, box: np.ndarray, keypoints: np.ndarray,
        contract: dict, cut_box: Callable | None = None,
        detector: Callable | None = None
        ) -> tuple[np.ndarray, str, np.ndarray]:
  """(crop, framing, matrix) of one detected face in an RGB image, in the
  contract's colour. cut_box(box, margin): the box crop (None:
  images.face_crop of image), for a file cut as training cuts it.
  detector: looks again at an aligned face (refined)."""
  size = contract['image_size']
  if contract['geometry'] == 'whole':  # crops cut already: as they are
    h, w = image.shape[:2]
    return (colour(images.resize(image, size), contract), 'whole',
            whole_matrix(w, h, size))
  matrix = aligned_matrix(keypoints, contract)
  if matrix is not None and detector is not None:
    matrix = refined(image, matrix, contract, detector)
  if matrix is not None:
    return colour(warp(image, matrix, size), contract), 'aligned', matrix
  calibration = (contract['box_calibration'] or {}).get(
      getattr(detector, 'name', None))
  box = training_box(box, calibration)
  margin = contract['margin']
  crop = (images.face_crop(image, box, margin, size) if cut_box is None
          else cut_box(box, margin))
  return (colour(crop, contract), 'box',
          region_matrix(images.face_region(box, margin), size))


def colour(crop: np.ndarray, contract: dict) -> np.ndarray:
  """crop (uint8 RGB [..., 3]) in the contract's colour."""
  return face_contract.to_grey(crop) if contract['colour'] == 'grey' else crop
