"""--mode=predict end to end: images and video frames per second, faces per
second (reading, detection, cropping, the model; compilation excluded).

Inputs made of real photographs from scikit-image and matplotlib (three
portraits, each with one face, as JPEGs at quality 90, and three photos
without a face), copied to a folder of NUM_PHOTOS files, and a 640 x 480
video of NUM_FRAMES frames panning over them. Run on a trained workdir:

  python -m benchmarks.predict_speed --workdir=runs/default
  python -m benchmarks.predict_speed --workdir=runs/default \
      --config.predict.detector=blazeface_short

predict writes its usual outputs into the workdir's report/predict/.
"""

import os
import sys
import tempfile
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import skimage.data
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fer_jax import predict, video  # noqa: E402

config_flags.DEFINE_config_file('config', 'configs/default.py', 'Config.')
flags.DEFINE_string('workdir', 'runs/default', 'A trained workdir.')
flags.DEFINE_integer('num_photos', 60, 'Image files in the folder.')
flags.DEFINE_integer('num_frames', 120, 'Frames of the video.')
FLAGS = flags.FLAGS
_SKIMAGE = Path(skimage.data.__file__).parent
PHOTOS = [_SKIMAGE / 'astronaut.png', _SKIMAGE / 'camera.png',
          Path(matplotlib.get_data_path()) / 'sample_data' / 'grace_hopper.jpg',
          _SKIMAGE / 'coffee.png', _SKIMAGE / 'chelsea.png',
          _SKIMAGE / 'rocket.jpg']


def make_inputs(folder: Path, num_photos: int, num_frames: int) -> None:
  """folder/photos/*.jpg and folder/pan.mp4."""
  pictures = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in PHOTOS]
  (folder / 'photos').mkdir(parents=True)
  for i in range(num_photos):
    cv2.imwrite(str(folder / 'photos' / f'{i:04d}.jpg'),
                pictures[i % len(pictures)], [cv2.IMWRITE_JPEG_QUALITY, 90])
  strip = np.concatenate([cv2.resize(p, (512, 512)) for p in pictures[:3]],
                         axis=1)
  out = video.writer(folder / 'pan.mp4', 30.0, (640, 480))
  for i in range(num_frames):
    x = int((strip.shape[1] - 512) * i / max(num_frames - 1, 1))
    out.write(cv2.resize(strip[:, x:x + 512], (640, 480)))
  out.release()


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as folder:
    folder = Path(folder)
    make_inputs(folder, FLAGS.num_photos, FLAGS.num_frames)
    for what in ('photos', 'pan.mp4'):
      print(f'--- {what}, predict.detector={FLAGS.config.predict.detector}, '
            f'{os.cpu_count()} CPUs')
      predict.predict(FLAGS.config, FLAGS.workdir, str(folder / what))


if __name__ == '__main__':
  app.run(main)
