"""fer_jax.Recognizer: a trained run's expressions and valence/arousal of
the faces in photos, image arrays, face crops and videos, from Python.

  rec = fer_jax.Recognizer.from_workdir('runs/default')
  for face in rec.predict('photo.jpg'):   # best detection first
    print(face.box, face.expression, face.valence, face.arousal)

Faces are found and cut as --mode=predict finds and cuts them (that mode
is built on this module): by the run's predict.detector, each face cut
as the run's face contract says (face_contract.py, framing.py: warped
onto the training faces' keypoint template, or the box training would
have cut), at data.image_size, in the contract's colour. The crops go
through one pmapped forward function, compiled once per batch bucket: a
batch of n crops is padded to the next power of two (a multiple of the
local devices, at most train.eval_batch_size), so one photo does not
cost a full evaluation batch.
"""

import dataclasses
import functools
import itertools
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import jax
import ml_collections
import numpy as np
from PIL import Image

from fer_jax import (config_rules, detect, face_contract, framing, inference,
                     models, steps, video, workdir as workdir_lib)
from fer_jax.data import images, pipeline
from fer_jax.data.index import check_image
from fer_jax.errors import DataError
from fer_jax.labels import run_classes

Detector = Callable[[np.ndarray], list[detect.Face]]


@dataclasses.dataclass
class Crop:
  """One face to classify, and where it came from."""
  path: str
  box: np.ndarray          # x, y, w, h in the (EXIF-turned) image or frame
  image: np.ndarray        # the S x S RGB crop
  face: int = 0            # its rank in the image, best detection first
  score: float | None = None  # the detector's; None without a detector
  frame: int | None = None    # videos: the frame index, its time, the track
  time: float | None = None
  track: int | None = None
  # How the face was cut (face_contract.FRAMINGS): 'aligned' (warped onto
  # the run's keypoint template), 'box' or 'whole'; matrix: the 2x3 map
  # from the image's pixels to the crop's.
  framing: str = 'box'
  matrix: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One face: where it is, and what the model makes of it."""
  box: tuple[float, ...]   # x, y, w, h in the image as shown
  score: float | None      # the detector's; None with detector 'none'
  expression: str          # the most probable class
  probs: dict[str, float]  # by class name, in the run's order
  valence: float           # in [-1, 1]
  arousal: float
  track: int | None = None  # videos: the same face from frame to frame


@dataclasses.dataclass(frozen=True)
class Frame:
  """The faces of one processed video frame."""
  index: int
  time: float | None       # seconds; None when the video does not say
  faces: list[Prediction]


def bucket_size(n: int, batch_size: int, num_devices: int) -> int:
  """The batch that n crops are padded to: the next power of two, rounded
  up to a multiple of num_devices, at most batch_size."""
  size = 1 << max(n - 1, 0).bit_length()
  return min(-(-size // num_devices) * num_devices, batch_size)


def forward(variables: dict, images: jax.Array, *, model,
            config: ml_collections.ConfigDict) -> dict:
  """probs, logits and valence/arousal of one device's uint8 crops, as
  evaluation computes them (eval.tta 'flip': the image and its mirror
  averaged, the logits being log-probabilities then)."""
  outputs = steps.eval_outputs(model, variables, images, config)
  return {'probs': jax.nn.softmax(outputs['logits']),
          'logits': outputs['logits'], 'va': outputs['va']}


def file_crops(path: Path, config: ml_collections.ConfigDict,
               detector: Detector | None, contract: dict | None = None
               ) -> list[Crop]:
  """The faces of an image file, best first, in the image as shown, each
  cut as the run's face contract says (None: the box convention, as runs
  from before contracts): a box from the file as training cuts a face box
  (a JPEG at the same reduced scale), or warped onto the contract's
  keypoint template; ValueError or OSError naming path if unreadable."""
  contract = contract or face_contract.legacy(config)
  size = config.data.image_size
  check_image(str(path))  # OpenCV decodes part of a truncated JPEG
  if detector is None:
    with Image.open(path) as header:
      box = np.array([0, 0, *images.shown_size(header)], float)
    return [_whole(str(path), box, images.load(str(path), size, orient=True),
                   contract)]
  data = path.read_bytes()
  image = images.decode(data, str(path), orient=True)
  cut_box = lambda box, margin: images.crop_encoded(
      data, str(path), size, box, margin, orient=True)
  return [_crop(str(path), image, face, rank, contract, detector, cut_box)
          for rank, face in enumerate(detector(image))]


def _whole(path: str, box: np.ndarray, image: np.ndarray, contract: dict
           ) -> Crop:
  return Crop(path, box, framing.colour(image, contract), framing='whole',
              matrix=framing.whole_matrix(box[2], box[3], image.shape[0]))


def _crop(path: str, image: np.ndarray, face: detect.Face, rank: int,
          contract: dict, detector: Detector,
          cut_box: Callable | None = None) -> Crop:
  crop, how, matrix = framing.cut(image, face.box, face.keypoints, contract,
                                  cut_box, detector)
  return Crop(path, face.box, crop, rank, face.score, framing=how,
              matrix=matrix)


def array_crops(image: np.ndarray, config: ml_collections.ConfigDict,
                detector: Detector | None, contract: dict | None = None
                ) -> list[Crop]:
  """The faces of an RGB uint8 image (a video frame), best first, cut as
  file_crops cuts them; without a detector the whole image, resized to a
  square."""
  contract = contract or face_contract.legacy(config)
  if detector is None:
    box = np.array([0, 0, image.shape[1], image.shape[0]], float)
    return [_whole('', box, images.resize(image, config.data.image_size),
                   contract)]
  return [_crop('', image, face, rank, contract, detector)
          for rank, face in enumerate(detector(image))]


def frame_crops(capture, fps: float, path: Path,
                config: ml_collections.ConfigDict, detector: Detector | None,
                every: int, contract: dict | None = None
                ) -> Iterator[tuple[int, float | None, list[Crop]]]:
  """(index, seconds, faces) of every every-th frame of an opened video;
  each face with its track (0 for the whole frame without a detector)."""
  tracker = video.Tracker()
  for index, seconds, frame in video.frames(capture, fps, every):
    crops = array_crops(frame, config, detector, contract)
    tracks = ([0] if detector is None else
              tracker.update([crop.box for crop in crops]))
    for crop, track in zip(crops, tracks):
      crop.path, crop.frame, crop.time, crop.track = (str(path), index,
                                                      seconds, track)
    yield index, seconds, crops


def checked(array, name: str, shape: str = '[H, W, 3]') -> np.ndarray:
  """array if it is RGB uint8 of shape ('[H, W, 3]' or '[N, H, W, 3]');
  TypeError or DataError naming it and what is wrong."""
  want = f'RGB uint8 {shape}'
  if not isinstance(array, np.ndarray):
    raise TypeError(f'{name}: {want} is expected, not '
                    f'{type(array).__name__}')
  if array.dtype != np.uint8:
    raise TypeError(f'{name}: dtype {array.dtype}; {want} is expected '
                    '(np.asarray(x, np.uint8) for values 0-255)')
  if (array.ndim != shape.count(',') + 1 or array.shape[-1] != 3 or
      not all(array.shape[-3:-1])):
    raise DataError(f'{name}: shape {array.shape}; {want} is expected')
  return array


def pixels(image) -> np.ndarray:
  """A PIL image (turned as its EXIF orientation shows it) or an array as
  RGB uint8 [H, W, 3]; TypeError or DataError saying what is wrong."""
  if isinstance(image, Image.Image):
    # libtiff turns TIFFs itself (as images.decode says).
    value = 1 if image.format == 'TIFF' else images.orientation(image)
    return images.turned(np.asarray(image.convert('RGB')), value)
  if not isinstance(image, np.ndarray):
    raise TypeError(f'image: a path, a PIL image or an RGB uint8 array '
                    f'[H, W, 3] is expected, not {type(image).__name__}')
  return np.ascontiguousarray(checked(image, 'image'))


def _existing(path, what: str) -> Path:
  path = Path(path)
  if not path.is_file():
    raise DataError(f'{path}: no such {what} file')
  return path


def _taken(frames: Iterator[tuple], count: int) -> list[tuple]:
  """Frames (..., crops) taken until they hold count crops, or count frames
  are taken (a stretch without faces is yielded as it is read), or the
  end."""
  taken, total = [], 0
  for frame in frames:
    taken.append(frame)
    total += len(frame[-1])
    if total >= count or len(taken) >= count:
      break
  return taken


def run_config(workdir: Path) -> ml_collections.ConfigDict:
  """The run's config.json over configs/default.py's config (the fields
  that a run of an older fer_jax lacks keep their defaults)."""
  from fer_jax.configs import default
  path = Path(workdir) / 'config.json'
  if not path.exists():  # inference.trained_config says so
    return default.get_config()
  return config_rules.merged(workdir_lib.read_json(path),
                             default.get_config(), keep=())


def _detector(config: ml_collections.ConfigDict) -> Detector | None:
  """config.predict.detector's function; None for 'none'."""
  p = config.predict
  return (None if p.detector == 'none' else
          detect.create_detector(p.detector, p.min_score, p.min_face_size))


class Recognizer:
  """A trained run, restored once, that predicts faces' expressions and
  valence/arousal (Recognizer.from_workdir builds it)."""

  def __init__(self, config: ml_collections.ConfigDict, variables: dict,
               step: int, detector: Detector | None,
               contract: dict | None = None):
    self.config = config          # the run's, with the inference settings
    # How its training faces were made (face_contract); None: the box
    # convention of runs from before contracts.
    self.contract = contract or face_contract.legacy(config)
    self.classes = run_classes(config)
    self.step = step              # the checkpoint's
    self.detector = detector      # None: each image is one face
    self.compile_seconds = 0.0    # spent compiling, over all calls
    model = models.create_model(config.model, axis_name=steps.AXIS,
                                num_classes=len(self.classes))
    self._variables = steps.replicate(variables)
    self._forward = jax.pmap(functools.partial(forward, model=model,
                                               config=config),
                             axis_name=steps.AXIS)
    self._compiled = {}           # batch bucket: executable
    self._compiling = threading.Lock()  # threads may share a Recognizer

  @classmethod
  def from_workdir(cls, workdir: str | Path,
                   checkpoint_step: int | None = None, tta: str = 'none',
                   detector: str | Detector | None = None,
                   config: ml_collections.ConfigDict | None = None
                   ) -> 'Recognizer':
    """The best (or given) checkpoint of a trained or imported run.

    tta: 'none' | 'flip' (the image and its mirror averaged). detector:
    None for the run's predict.detector, a name of detect.DETECTORS
    ('none': every image is a face crop already), or a function from an
    RGB image to its detect.Face list. config: settings that inference
    takes from the command line (config_rules.DEPLOY_FIELDS; None: the
    run's own), as --mode=predict passes them. Only the workdir is read:
    the data fields are the run's, and its data set need not be there.
    """
    workdir = Path(workdir)
    config = inference.deploy_config(
        run_config(workdir) if config is None else config, workdir)
    config.eval.tta = tta
    if isinstance(detector, str):
      config.predict.detector = detector
    elif not (detector is None or callable(detector)):
      raise TypeError(f'detector: a name of {detect.DETECTORS}, a function '
                      f'or None, not {type(detector).__name__}')
    config_rules.check(config, jax.device_count(), training=False,
                       reads_data=False)
    function = detector if callable(detector) else _detector(config)
    contract = face_contract.read(workdir, config)
    if contract['image_size'] != config.data.image_size:
      raise DataError(f"{workdir / face_contract.FILE}: image_size "
                      f"{contract['image_size']} is not the run's "
                      f'data.image_size {config.data.image_size}')
    state, step, _ = inference.restore_state(config, workdir,
                                             checkpoint_step)
    return cls(config, steps.eval_variables(state), step, function,
               contract)

  def _executable(self, size: int) -> Callable:
    """The forward function compiled for a batch of size crops, once
    even when threads ask for it at the same time."""
    with self._compiling:
      if size in self._compiled:
        return self._compiled[size]
      start = time.perf_counter()
      image, devices = self.config.data.image_size, jax.local_device_count()
      shape = jax.ShapeDtypeStruct(
          (devices, size // devices, image, image, 3), np.uint8)
      self._compiled[size] = self._forward.lower(self._variables,
                                                 shape).compile()
      self.compile_seconds += time.perf_counter() - start
    return self._compiled[size]

  def _batch(self, crops: np.ndarray) -> dict:
    n, num_devices = len(crops), jax.local_device_count()
    size = bucket_size(n, self.config.train.eval_batch_size, num_devices)
    batch = pipeline.pad_and_shard({'image': crops, 'mask': np.ones(n, bool)},
                                   size, num_devices)
    out = jax.device_get(self._executable(size)(self._variables,
                                                batch['image']))
    return {k: v.reshape(size, -1)[:n] for k, v in out.items()}

  def predict_crops(self, crops: np.ndarray) -> dict[str, np.ndarray]:
    """probs [N, K], logits [N, K] and valence/arousal va [N, 2] (clipped
    to [-1, 1], as --mode=predict reports them) of uint8 RGB face crops
    [N, H, W, 3] cut as the face contract says, resized to
    data.image_size if of another size, in the contract's colour (grey
    models see them grey)."""
    crops = checked(crops, 'crops', '[N, H, W, 3]')
    size = self.config.data.image_size
    if crops.shape[1:3] != (size, size):
      crops = np.stack([images.resize(c, size) for c in crops])
    crops = framing.colour(crops, self.contract)
    batch_size, k = self.config.train.eval_batch_size, len(self.classes)
    outs = [self._batch(crops[i:i + batch_size])
            for i in range(0, len(crops), batch_size)]
    out = {name: np.concatenate([o[name] for o in outs]) if outs else
           np.zeros((0, width), np.float32)
           for name, width in (('probs', k), ('logits', k), ('va', 2))}
    out['va'] = np.clip(out['va'], -1, 1)
    return out

  def classify(self, crops: Iterable[Crop]
               ) -> Iterator[tuple[Crop, np.ndarray, np.ndarray]]:
    """(crop, probabilities [K], valence/arousal [2]) of each crop, read
    and classified a batch at a time; each crop's pixels are let go."""
    crops = iter(crops)
    while chunk := list(itertools.islice(
        crops, self.config.train.eval_batch_size)):
      out = self.predict_crops(np.stack([c.image for c in chunk]))
      for crop, p, v in zip(chunk, out['probs'], out['va']):
        crop.image = None
        yield crop, p, v

  def _prediction(self, crop: Crop, probs: np.ndarray, va: np.ndarray
                  ) -> Prediction:
    return Prediction(
        box=tuple(map(float, crop.box)), score=crop.score,
        expression=self.classes[int(probs.argmax())],
        probs=dict(zip(self.classes, map(float, probs))),
        valence=float(va[0]), arousal=float(va[1]), track=crop.track)

  def predict(self, image) -> list[Prediction]:
    """The faces of an image, best detection first: a path (as
    --mode=predict reads it), a PIL image or an RGB uint8 array [H, W, 3].
    Boxes are in the image as shown (a photo's EXIF orientation applied).
    """
    if isinstance(image, (str, Path)):
      path = _existing(image, 'image')
      try:
        crops = file_crops(path, self.config, self.detector,
                           self.contract)
      except (ValueError, OSError) as e:
        raise DataError(str(e) if str(path) in str(e) else
                        f'{path}: {e}') from e
    else:
      crops = array_crops(pixels(image), self.config, self.detector,
                          self.contract)
    return [self._prediction(*result) for result in self.classify(crops)]

  def predict_video(self, path: str | Path, every: int | None = None
                    ) -> Iterator[Frame]:
    """The faces of every every-th frame of a video (None: the run's
    predict.video_every), frame by frame, each face with its track; not
    smoothed (--mode=predict's predict.smoothing is applied to its rows)."""
    every = self.config.predict.video_every if every is None else every
    if not isinstance(every, int) or every < 1:
      raise ValueError(f'every: {every!r} is not an integer >= 1')
    path = _existing(path, 'video')
    try:
      capture, fps, _ = video.open_video(str(path))
    except ValueError as e:
      raise DataError(str(e)) from None
    return self._frames(capture, fps, path, every)

  def _frames(self, capture, fps: float, path: Path, every: int
              ) -> Iterator[Frame]:
    """Frames classified a batch of faces at a time, yielded in order: each
    within train.eval_batch_size frames read."""
    frames = frame_crops(capture, fps, path, self.config, self.detector,
                         every, self.contract)
    try:
      while pending := _taken(frames, self.config.train.eval_batch_size):
        results = self.classify(c for *_, crops in pending for c in crops)
        for index, seconds, crops in pending:
          yield Frame(index, seconds, [self._prediction(*next(results))
                                       for _ in crops])
    finally:
      capture.release()
