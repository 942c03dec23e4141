"""Images: decoding, the face crop, and the training augmentations.

Every example becomes uint8 RGB [S, S, 3] (S = data.image_size) in two
steps. The base transform, the same in training, evaluation and prediction:
decode, cut the face region (a square around the face box enlarged by
data.face_margin when the layout has boxes, else the whole image) and
resize it to S. The augmentation, in training only, on that base image:
one affine warp (random resized crop, rotation, horizontal flip), colour
jitter as one 3x4 colour matrix, and random erasing.

OpenCV does the pixel work: its bilinear affine warp of a 224 px image
takes 0.10 ms against Pillow's 0.83 ms, which alone would have held the
pipeline under 1,000 images/s per core (docs/performance.md). Pillow reads
headers and checks files when indexing: unlike OpenCV it raises on a
truncated JPEG.
"""

import io
import math

import cv2
import ml_collections
import numpy as np
from PIL import Image

# Grain's threads and worker processes parallelise; OpenCV's own thread
# pool would only contend with them.
cv2.setNumThreads(1)
# Pixels as stored: OpenCV's EXIF rotation off, so face boxes and image
# sizes from indexing refer to the same pixels. Where an image is shown
# upright (predict), the orientation is Pillow's reading of the EXIF,
# applied here (OpenCV misses it in TIFFs and PNGs).
_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2,
          4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
_EXIF_ORIENTATION = 0x0112
# ITU-R 601 luma, as torchvision's rgb_to_grayscale.
_LUMA = np.array([0.299, 0.587, 0.114])
_IDENTITY = np.eye(2, 3)


def face_region(box: np.ndarray, margin: float) -> np.ndarray:
  """The square (x0, y0, side) around a face box (x, y, w, h) with margin.

  Its side is max(w, h) x (1 + 2 margin): a margin of 0.1 adds a tenth of
  the box on every side.
  """
  x, y, w, h = (float(v) for v in box)
  side = max(w, h) * (1 + 2 * margin)
  return np.array([x + w / 2 - side / 2, y + h / 2 - side / 2, side])


def _reduction(region_size: float, size: int, is_jpeg: bool) -> int:
  """The largest JPEG DCT scaling (1, 2, 4, 8) that keeps >= size pixels."""
  if not is_jpeg:
    return 1
  for factor in (8, 4, 2):
    if region_size / factor >= size:
      return factor
  return 1


def orientation(header: Image.Image) -> int:
  """The EXIF orientation (1-8) of an opened image; 1 without one, or when
  the EXIF block cannot be parsed."""
  try:
    value = header.getexif().get(_EXIF_ORIENTATION, 1)
  except Exception:  # noqa: BLE001  (malformed EXIF: Pillow raises anything)
    return 1
  return value if value in range(1, 9) else 1


def shown_size(header: Image.Image) -> tuple[int, int]:
  """(width, height) of an opened image as its EXIF orientation shows it."""
  width, height = header.size
  return (height, width) if orientation(header) in (5, 6, 7, 8) else (
      width, height)


def turned(image: np.ndarray, value: int) -> np.ndarray:
  """image as EXIF orientation `value` says it is shown (as Pillow's
  ImageOps.exif_transpose turns it)."""
  if value in (5, 6, 7, 8):  # a quarter turn (and a mirror for 5 and 7)
    image = np.rot90(image, 1 if value in (5, 8) else -1)
    value = {5: 4, 6: 1, 7: 4, 8: 1}[value]
  if value in (2, 3):
    image = image[:, ::-1]
  if value in (3, 4):
    image = image[::-1]
  return np.ascontiguousarray(image)


def decode(data: bytes, path: str, reduce: int = 1,
           orient: bool = False) -> np.ndarray:
  """Encoded bytes as uint8 RGB [H, W, 3], optionally at 1/reduce scale.

  orient: turned as the EXIF orientation says (as a phone photo is shown);
  else the pixels as stored.
  """
  flags = _FLAGS[reduce] | cv2.IMREAD_IGNORE_ORIENTATION
  image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
  if image is None:
    raise ValueError(f'{path}: cannot decode image')
  image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
  if not orient:  # as stored: no need to read the EXIF (training's path)
    return image
  try:
    with Image.open(io.BytesIO(data)) as header:
      value, tiff = orientation(header), header.format == 'TIFF'
  except OSError:  # OpenCV decoded what Pillow cannot open: as stored
    return image
  # libtiff turns TIFFs itself, in OpenCV and Pillow alike.
  return image if tiff else turned(image, value)


def _crop_square(image: np.ndarray, x0: float, y0: float,
                 side: float) -> np.ndarray:
  """image[y0:y0+side, x0:x0+side], padded with black beyond the edges."""
  h, w = image.shape[:2]
  x0, y0 = int(round(x0)), int(round(y0))
  side = max(int(round(side)), 1)
  pad = max(0, -x0, -y0, x0 + side - w, y0 + side - h)
  if pad:
    image = cv2.copyMakeBorder(image, pad, pad, pad, pad,
                               cv2.BORDER_CONSTANT, value=(0, 0, 0))
    x0, y0 = x0 + pad, y0 + pad
  return image[y0:y0 + side, x0:x0 + side]


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """Area averaging to shrink (no aliasing), bilinear to enlarge."""
  if image.shape[:2] == (size, size):
    return image
  shrink = image.shape[0] > size and image.shape[1] > size
  return cv2.resize(image, (size, size), interpolation=(
      cv2.INTER_AREA if shrink else cv2.INTER_LINEAR))


def face_crop(image: np.ndarray, box: np.ndarray, margin: float,
              size: int) -> np.ndarray:
  """The face region around box (x, y, w, h) with margin, S x S."""
  return resize(_crop_square(image, *face_region(box, margin)), size)


def from_pixels(pixels: np.ndarray, size: int) -> np.ndarray:
  """The base image of stored pixels (FER2013's 48 x 48 grey values):
  grey replicated to RGB, resized to S x S."""
  pixels = np.asarray(pixels, np.uint8)
  if pixels.ndim == 2:
    pixels = np.repeat(pixels[:, :, None], 3, axis=2)
  return resize(pixels, size)


def load(path: str, size: int, box: np.ndarray | None = None,
         margin: float = 0.0, orient: bool = False) -> np.ndarray:
  """The base image: the face region of the file at path, S x S RGB uint8
  (crop_encoded of its bytes)."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise ValueError(f'{path}: cannot decode image: {e}') from e
  return crop_encoded(data, path, size, box, margin, orient)


def crop_encoded(data: bytes, path: str, size: int,
                 box: np.ndarray | None = None, margin: float = 0.0,
                 orient: bool = False) -> np.ndarray:
  """The face region of an encoded image, S x S RGB uint8.

  box: (x, y, w, h) in the image's pixels, or None (or NaN) for the whole
  image, which is resized to a square. JPEGs are decoded at the smallest
  DCT scale that still holds `size` pixels across the region. orient: the
  image (and box) as its EXIF orientation shows it; else as stored.
  """
  try:
    with Image.open(io.BytesIO(data)) as header:
      width, height = shown_size(header) if orient else header.size
      is_jpeg = header.format == 'JPEG'
  except OSError as e:
    raise ValueError(f'{path}: cannot decode image: {e}') from e
  whole = box is None or not np.all(np.isfinite(box))
  region = (np.array([0.0, 0.0, max(width, height)]) if whole
            else face_region(box, margin))
  x0, y0, side = region
  if x0 >= width or y0 >= height or x0 + side <= 0 or y0 + side <= 0:
    raise ValueError(f'{path}: face box {np.asarray(box).tolist()} lies '
                     f'outside the {width}x{height} image')
  reduce = _reduction(min(region[2], width, height), size, is_jpeg)
  image = decode(data, path, reduce, orient)
  if whole:
    return resize(image, size)
  # Each decoded pixel covers `reduce` stored ones (libjpeg rounds the
  # reduced width up, so width / shape would misplace the box).
  scale = 1.0 / reduce
  return resize(_crop_square(image, *(region * scale)), size)


def _sample_crop(rng: np.random.Generator, size: int, scale: tuple,
                 ratio: tuple) -> tuple[float, float, float, float]:
  """A random resized crop (cx, cy, w, h), as torchvision samples it."""
  area = size * size
  log_ratio = np.log(ratio)
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
    if w <= size and h <= size:
      return (rng.uniform(w / 2, size - w / 2),
              rng.uniform(h / 2, size - h / 2), w, h)
  return size / 2, size / 2, float(size), float(size)


def warp_matrix(size: int, crop: tuple, angle_degrees: float,
                flip: bool) -> np.ndarray:
  """The 2x3 map from output to input pixel centres of one warp.

  crop: (cx, cy, w, h) in input pixels (continuous coordinates, pixel i
  spanning [i, i + 1)); the output shows it resized to size x size,
  rotated by angle_degrees (counter-clockwise on screen) about its centre
  and, if flip, mirrored. Output pixel centre u + 0.5 maps through: centre,
  mirror, scale to the crop, rotate, move to the crop's centre; minus 0.5
  gives OpenCV's integer pixel centres.
  """
  cx, cy, w, h = crop
  angle = math.radians(angle_degrees)
  cos, sin = math.cos(angle), math.sin(angle)
  linear = np.array([[cos, -sin], [sin, cos]]) @ np.diag(
      [(-1.0 if flip else 1.0) * w / size, h / size])
  shift = np.array([cx, cy]) - linear @ np.full(2, size / 2)
  shift += linear @ np.full(2, 0.5) - 0.5
  return np.concatenate([linear, shift[:, None]], axis=1)


def affine_matrix(rng: np.random.Generator, size: int,
                  augment: ml_collections.ConfigDict) -> np.ndarray:
  """warp_matrix of a random crop, rotation and flip; all off: identity."""
  crop = _sample_crop(rng, size, augment.crop_scale, augment.crop_ratio)
  flip = bool(augment.flip) and rng.random() < 0.5
  angle = rng.uniform(-1, 1) * augment.rotation_degrees
  return warp_matrix(size, crop, angle, flip)


def colour_matrix(rng: np.random.Generator, image: np.ndarray,
                  augment: ml_collections.ConfigDict) -> np.ndarray:
  """The 3x4 matrix of brightness, then contrast, then saturation jitter.

  Factors are drawn as torchvision's ColorJitter draws them (uniform in
  [max(0, 1 - x), 1 + x]). Contrast blends with the mean grey level, as
  torchvision's adjust_contrast does; composed into one matrix, values are
  clipped once at the end instead of after every step.
  """
  b, c, s = (rng.uniform(max(0.0, 1 - x), 1 + x) for x in (
      augment.brightness, augment.contrast, augment.saturation))
  channel_sums = cv2.sumElems(image)[:3]  # 25x faster than cv2.mean here
  mean_grey = float(np.dot(channel_sums, _LUMA)) / (image.shape[0] *
                                                    image.shape[1])
  saturation = s * np.eye(3) + (1 - s) * np.outer(np.ones(3), _LUMA)
  offset = (1 - c) * b * mean_grey  # saturation maps grey to grey
  return np.concatenate([c * b * saturation, np.full((3, 1), offset)], axis=1)


def erase(image: np.ndarray, rng: np.random.Generator,
          augment: ml_collections.ConfigDict) -> np.ndarray:
  """Random erasing (Zhong et al., 2020): a rectangle of uniform noise."""
  if rng.random() >= augment.erasing_prob:
    return image
  size = image.shape[0]
  log_ratio = np.log(augment.erasing_ratio)
  for _ in range(10):
    area = size * size * rng.uniform(*augment.erasing_scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    h = int(round(math.sqrt(area * aspect)))
    w = int(round(math.sqrt(area / aspect)))
    if 0 < h < size and 0 < w < size:
      y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
      image = image.copy()
      image[y:y + h, x:x + w] = rng.integers(0, 256, (h, w, 3), np.uint8)
      return image
  return image


def augment_image(image: np.ndarray, rng: np.random.Generator,
                  augment: ml_collections.ConfigDict) -> np.ndarray:
  """The training augmentation of one base image (uint8 [S, S, 3])."""
  size = image.shape[0]
  matrix = affine_matrix(rng, size, augment)
  if np.abs(matrix - _IDENTITY).max() > 1e-9:
    image = cv2.warpAffine(image, matrix, (size, size),
                           flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_REFLECT_101)
  if augment.brightness or augment.contrast or augment.saturation:
    image = cv2.transform(image, colour_matrix(rng, image, augment))
  return erase(image, rng, augment)
