"""Face sets made from real photographs with a known keypoint template
(scikit-image's astronaut and camera, matplotlib's Grace Hopper: public
domain), for the face contract's tests and its documentation figure:

  python -m tests.face_sets docs/face_contract.jpg
"""

import math
import sys
from pathlib import Path

import cv2
import numpy as np

# Where the set's faces put the right eye, left eye, nose tip and mouth
# centre (fractions of the side): RAF-DB-like, and a tighter FER2013-like.
RAF_TEMPLATE = np.array([[0.35, 0.42], [0.65, 0.42], [0.5, 0.58],
                         [0.5, 0.72]])
FER_TEMPLATE = np.array([[0.3, 0.36], [0.7, 0.36], [0.5, 0.56],
                         [0.5, 0.74]])
# (degrees, scale, shift) of the faces in new photographs.
TURNS = ((10, 1.0, (40, -30)), (-18, 1.3, (-60, 20)), (25, 1.1, (10, 50)))


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
  """points [K, 2] mapped by a 2x3 matrix."""
  return points @ matrix[:, :2].T + matrix[:, 2]


def aligned_set(faces: dict, template: np.ndarray, side: int, count: int,
                names=('astronaut', 'hopper')) -> list[np.ndarray]:
  """Faces warped (by OpenCV's own similarity fit) so that their
  keypoints fall on template, jittered a little, as an aligned data set."""
  rng = np.random.default_rng(0)
  out = []
  for k in range(count):
    image, points = faces[names[k % len(names)]]
    angle = math.radians(rng.uniform(-2, 2))
    rotation = np.array([[math.cos(angle), -math.sin(angle)],
                         [math.sin(angle), math.cos(angle)]])
    target = ((template - 0.5) @ rotation.T * rng.uniform(0.97, 1.03) + 0.5
              + rng.normal(0, 0.01, 2)) * side
    matrix, _ = cv2.estimateAffinePartial2D(points.astype(np.float32),
                                            target.astype(np.float32))
    out.append(cv2.warpAffine(image, matrix, (side, side),
                              flags=cv2.INTER_AREA))
  return out

def turned(image: np.ndarray, points: np.ndarray, degrees: float,
           scale: float, shift) -> tuple[np.ndarray, np.ndarray]:
  """The photo turned, scaled and moved in a larger one; its keypoints
  there."""
  h, w = image.shape[:2]
  matrix = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, scale)
  matrix[:, 2] += np.array([(640 - w) / 2, (640 - h) / 2]) + shift
  return (cv2.warpAffine(image, matrix, (640, 640)),
          apply(matrix, points))


def photo_faces(photos: dict, detector) -> dict:
  """{name: (RGB photo, its face's keypoints [4, 2])}: the astronaut,
  Grace Hopper, and scikit-image's camera man (a face turned aside)."""
  import skimage.data
  from fer_jax.data import images
  out = {}
  for name in ('astronaut', 'hopper'):
    image = images.decode(photos[name].read_bytes(), str(photos[name]))
    out[name] = image, detector(image)[0].keypoints[:4]
  camera = np.repeat(skimage.data.camera()[:, :, None], 3, axis=2)
  out['camera'] = camera, detector(camera)[0].keypoints[:4]
  return out


def photo_paths() -> dict[str, Path]:
  """The photographs with a face that registry packages ship."""
  import matplotlib
  import skimage.data
  return {'astronaut': Path(skimage.data.__file__).parent / 'astronaut.png',
          'hopper': Path(matplotlib.get_data_path()) / 'sample_data' /
                    'grace_hopper.jpg'}


def records(n: int, boxes: np.ndarray | None = None,
            paths: list | None = None):
  """n training records without labels: files named 0.png, ... (or
  paths), with boxes (None: whole images)."""
  from fer_jax.data.index import Records
  return Records(np.array(paths or [f'{i}.png' for i in range(n)]),
                 np.zeros(n, np.int32), np.zeros((n, 2), np.float32),
                 np.zeros(n, bool), np.full((n, 4), np.nan, np.float32)
                 if boxes is None else boxes.astype(np.float32))


def _row(faces: dict, detector, template: np.ndarray, side: int,
         grey: bool, size: int) -> list[np.ndarray]:
  """Three training faces of a set, the faces predict cuts by its
  contract from turned photographs, and the box convention's cuts."""
  from fer_jax import face_contract, recognizer
  from fer_jax.configs import default
  from fer_jax.data import images
  train = aligned_set(faces, template, side, 16)
  train = [face_contract.to_grey(f) if grey else f for f in train]
  config = default.get_config()
  config.data.layout = 'fer2013' if grey else 'rafdb'
  config.data.image_size, config.data.classes = size, ''
  contract = face_contract.build(
      config, records(len(train)), lambda i: images.resize(train[i], size),
      {'blazeface_full': detector})
  names = ('astronaut', 'hopper', 'camera' if grey else 'astronaut')
  photos = [turned(*faces[name], *turn)[0] for name, turn in zip(names,
                                                                  TURNS)]
  cut = lambda photo, c: recognizer.array_crops(photo, config, detector,
                                                c)[0].image
  return ([images.resize(f, size) for f in train[:3]] +
          [cut(p, contract) for p in photos] + [cut(p, None) for p in photos])


def figure(path: Path, size: int = 64, zoom: int = 2) -> None:
  """Training faces of a RAF-DB-style and a FER2013-style set made from
  the photographs; the crops predict cuts from the same faces turned in
  new photographs, by each set's face contract and by the box convention
  that runs without one get."""
  from fer_jax import detect
  detector = detect.create_detector('blazeface_full', 0.5, 0.0)
  faces = photo_faces(photo_paths(), detector)
  tile, gap = size * zoom, 24
  rows = [_row(faces, detector, RAF_TEMPLATE, 100, False, size),
          _row(faces, detector, FER_TEMPLATE, 48, True, size)]
  sheet = np.full((gap + len(rows) * (tile + 8), 9 * tile + 2 * gap, 3), 255,
                  np.uint8)
  for r, row in enumerate(rows):
    for k, image in enumerate(row):
      x, y = k * tile + (k // 3) * gap, gap + r * (tile + 8)
      sheet[y:y + tile, x:x + tile] = cv2.resize(
          image, (tile, tile), interpolation=cv2.INTER_NEAREST)
  for k, title in enumerate(('training faces', 'predict: the contract',
                             'predict: box convention')):
    cv2.putText(sheet, title, (k * (3 * tile + gap) + 4, 17),
                cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
  cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR),
              [cv2.IMWRITE_JPEG_QUALITY, 90])


if __name__ == '__main__':
  figure(Path(sys.argv[1]))
