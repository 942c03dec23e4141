"""Per-image cost of the pipeline's pixel operations: Pillow against OpenCV.

Why fer_jax/data/images.py decodes and warps with OpenCV: one 224 px JPEG
(camera-like texture, quality 90), timed on one thread, median of 5 runs
of N calls.

  python -m benchmarks.image_ops
"""

import io
import time

import cv2
import numpy as np
from PIL import Image

SIZE = 224
CALLS = 300


def _photo_like_jpeg() -> bytes:
  rng = np.random.default_rng(0)
  y, x = np.mgrid[:SIZE, :SIZE] / SIZE
  image = 128 + 60 * np.sin(6 * x + 3 * y)[..., None] * np.array([1, .8, .6])
  image += cv2.GaussianBlur(rng.normal(0, 25, image.shape), (0, 0), 1.5)
  buffer = io.BytesIO()
  Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
      buffer, 'JPEG', quality=90)
  return buffer.getvalue()


def _ms(fn) -> float:
  runs = []
  for _ in range(5):
    start = time.perf_counter()
    for _ in range(CALLS):
      fn()
    runs.append((time.perf_counter() - start) / CALLS * 1e3)
  return float(np.median(runs))


def main():
  cv2.setNumThreads(1)
  data = _photo_like_jpeg()
  array = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8),
                                    cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
  pil = Image.fromarray(array)
  angle = np.radians(8)
  matrix = np.array([[np.cos(angle) * .9, -np.sin(angle) * .9, 12.0],
                     [np.sin(angle) * .9, np.cos(angle) * .9, -5.0]])
  rows = [
      ('decode', lambda: Image.open(io.BytesIO(data)).convert('RGB').load(),
       lambda: cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8),
                                         cv2.IMREAD_COLOR),
                            cv2.COLOR_BGR2RGB)),
      ('affine warp, bilinear',
       lambda: pil.transform((SIZE, SIZE), Image.Transform.AFFINE,
                             tuple(matrix.reshape(-1)),
                             resample=Image.Resampling.BILINEAR),
       lambda: cv2.warpAffine(array, matrix, (SIZE, SIZE),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)),
      ('resize 224 -> 72',
       lambda: pil.resize((72, 72), Image.Resampling.BILINEAR),
       lambda: cv2.resize(array, (72, 72), interpolation=cv2.INTER_AREA)),
      ('3x4 colour matrix',
       lambda: pil.convert('RGB', tuple(np.c_[np.eye(3) * 1.1,
                                               np.full(3, -5.)].reshape(-1))),
       lambda: cv2.transform(array, np.c_[np.eye(3) * 1.1, np.full(3, -5.)])),
  ]
  print(f'{len(data) / 1e3:.1f} KB JPEG, {SIZE} px, ms per call')
  print(f"{'operation':24} {'Pillow':>8} {'OpenCV':>8} {'ratio':>6}")
  for name, with_pil, with_cv2 in rows:
    a, b = _ms(with_pil), _ms(with_cv2)
    print(f'{name:24} {a:8.3f} {b:8.3f} {a / b:6.1f}')


if __name__ == '__main__':
  main()
