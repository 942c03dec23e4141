"""fer_jax.Recognizer: --mode=predict's faces and numbers from paths, PIL
images, arrays, crops and videos; bad inputs named. And fer_jax.train and
fer_jax.evaluate, the modes' calls."""

import concurrent.futures
import csv
import inspect
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import fer_jax
from fer_jax import predict, recognizer, video
from fer_jax.errors import DataError, UsageError
from tests.test_predict import _exif_turned, _real_video
from tests.test_video import grey_video


@pytest.fixture(scope='module')
def rec(trained):
  """The shared run's Recognizer: its detector (BlazeFace, full range)."""
  return fer_jax.Recognizer.from_workdir(trained[1])


def _same(face: recognizer.Prediction, row: dict, classes: tuple) -> None:
  """face as its predictions.csv row writes it (boxes to 0.1 px, scores
  to 1e-4, probabilities and valence/arousal to 1e-6)."""
  assert [f'{v:.1f}' for v in face.box] == [row[k] for k in 'xywh']
  assert f'{face.score:.4f}' == row['score']
  assert face.expression == row['expression']
  np.testing.assert_allclose([face.probs[c] for c in classes],
                             [float(row[f'prob_{c}']) for c in classes],
                             atol=1e-6)
  np.testing.assert_allclose([face.valence, face.arousal],
                             [float(row['valence']), float(row['arousal'])],
                             atol=1e-6)


def test_photos_and_a_video_give_predict_modes_faces_and_numbers(
    finished, rec, photos, tmp_path):
  config, workdir, _ = finished
  folder = tmp_path / 'inputs'
  folder.mkdir()
  for name in ('astronaut', 'hopper'):  # a PNG and a JPEG
    shutil.copy(photos[name], folder / f'{name}{photos[name].suffix}')
  _real_video(photos, folder / 'walk.mp4')
  rows = {}
  for row in csv.DictReader(open(predict.predict(config, str(workdir),
                                                 str(folder)))):
    rows.setdefault(Path(row['path']).name, []).append(row)
  for name in ('astronaut.png', 'hopper.jpg'):
    face, = rec.predict(folder / name)
    row, = rows[name]
    _same(face, row, rec.classes)
  frames = list(rec.predict_video(str(folder / 'walk.mp4')))
  walk = rows['walk.mp4']
  assert [f.index for f in frames] == [int(r['frame']) for r in walk]
  assert [f.time for f in frames] == pytest.approx(
      [float(r['time_s']) for r in walk], abs=5e-4)
  for frame, row in zip(frames, walk):
    face, = frame.faces
    _same(face, row, rec.classes)
    assert str(face.track) == row['track']


def test_path_pil_image_and_array_give_the_same_faces_compiled_once(
    rec, photos, tmp_path):
  by_path, = rec.predict(photos['astronaut'])  # a PNG: no JPEG reduction
  compiled = rec.compile_seconds
  image = Image.open(photos['astronaut'])
  for given in (image, np.asarray(image.convert('RGB'))):
    face, = rec.predict(given)
    np.testing.assert_array_equal(face.box, by_path.box)
    assert face.probs == by_path.probs
    assert (face.valence, face.arousal) == (by_path.valence, by_path.arousal)
  # A phone photo's PIL image is read as shown: as its upright copy.
  _exif_turned(photos['hopper'], tmp_path / 'phone.jpg')
  turned = Image.open(tmp_path / 'phone.jpg')
  assert rec.predict(turned) == rec.predict(ImageOps.exif_transpose(turned))
  assert rec.compile_seconds == compiled  # one batch bucket, reused


def test_threads_sharing_a_recognizer_get_the_serial_answers(rec, photos):
  """4 threads x 50 photos at once: each answer is the photo's serial one
  (one LiteRT interpreter shared across threads raised RuntimeErrors)."""
  names = ('astronaut', 'hopper')
  serial = {name: rec.predict(photos[name]) for name in names}

  def calls(thread: int) -> list[tuple]:
    return [(name, rec.predict(photos[name])) for name in
            (names[(thread + i) % 2] for i in range(50))]

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    answers = [a for answers in pool.map(calls, range(4)) for a in answers]
  assert len(answers) == 200
  for name, faces in answers:
    assert faces == serial[name]


def test_a_video_without_faces_yields_each_frame_within_a_batch_read(
    rec, tmp_path, monkeypatch):
  path = grey_video(tmp_path / 'empty.mp4', 40, step=5)
  read = []

  def frames(*args):
    for frame in video_frames(*args):
      read.append(frame[0])
      yield frame

  video_frames = video.frames
  monkeypatch.setattr(video, 'frames', frames)
  seen = []
  for frame in rec.predict_video(path, every=1):
    seen.append((frame.index, len(read), frame.faces))
  batch = rec.config.train.eval_batch_size
  assert [index for index, _, _ in seen] == list(range(40))
  assert all(count - index <= batch and not faces
             for index, count, faces in seen)


def test_predict_crops_gives_probabilities_logits_and_va_per_crop(rec):
  rng = np.random.default_rng(0)
  size = rec.config.data.image_size
  crops = rng.integers(0, 256, (2, size, size, 3), np.uint8)
  out = rec.predict_crops(crops)
  assert {k: v.shape for k, v in out.items()} == {
      'probs': (2, 8), 'logits': (2, 8), 'va': (2, 2)}
  logits = out['logits'].astype(np.float64)
  softmax = np.exp(logits - logits.max(1, keepdims=True))
  np.testing.assert_allclose(out['probs'], softmax / softmax.sum(
      1, keepdims=True), atol=1e-6)
  assert np.all(np.abs(out['va']) <= 1)
  # Each crop's numbers are its own, whatever else is in the batch.
  alone = rec.predict_crops(crops[1:])
  np.testing.assert_array_equal(alone['probs'][0], out['probs'][1])
  # Crops of another size are resized to the run's.
  big = rng.integers(0, 256, (1, 2 * size, size, 3), np.uint8)
  np.testing.assert_array_equal(
      rec.predict_crops(big)['logits'],
      rec.predict_crops(recognizer.images.resize(big[0], size)[None])[
          'logits'])
  assert rec.predict_crops(crops[:0])['probs'].shape == (0, 8)


def test_batches_pad_to_a_power_of_two_bucket_that_the_devices_divide():
  bucket = recognizer.bucket_size
  assert [bucket(n, 16, 2) for n in (1, 2, 3, 5, 9, 16)] == [
      2, 2, 4, 8, 16, 16]
  assert [bucket(n, 12, 4) for n in (1, 5, 9, 12)] == [4, 8, 12, 12]
  assert [bucket(n, 128, 1) for n in (1, 3, 100)] == [1, 4, 128]


def test_bad_inputs_raise_errors_that_name_them(rec, trained, photos,
                                                tmp_path):
  (tmp_path / 'notes.jpg').write_text('not an image')
  whole = photos['hopper'].read_bytes()
  (tmp_path / 'cut.jpg').write_bytes(whole[:len(whole) // 2])
  (tmp_path / 'notes.mp4').write_text('not a video')
  for call, error, message in [
      (lambda: rec.predict(tmp_path / 'nowhere.jpg'), DataError,
       'nowhere.jpg: no such image file'),
      (lambda: rec.predict(str(tmp_path / 'notes.jpg')), DataError,
       'notes.jpg: not a readable image'),
      (lambda: rec.predict(tmp_path / 'cut.jpg'), DataError,
       'cut.jpg: not a readable image'),
      (lambda: rec.predict(np.zeros((8, 8, 3))), TypeError,
       r'image: dtype float64; RGB uint8 \[H, W, 3\]'),
      (lambda: rec.predict(np.zeros((8, 8), np.uint8)), DataError,
       r'image: shape \(8, 8\)'),
      (lambda: rec.predict(np.zeros((8, 8, 4), np.uint8)), DataError,
       r'image: shape \(8, 8, 4\)'),
      (lambda: rec.predict([[0, 0, 0]]), TypeError, 'not list'),
      (lambda: rec.predict_crops(np.zeros((32, 32, 3), np.uint8)),
       DataError, r'crops: shape \(32, 32, 3\); RGB uint8 \[N, H, W, 3\]'),
      (lambda: rec.predict_crops(np.zeros((1, 32, 32, 3), np.float32)),
       TypeError, 'crops: dtype float32'),
      (lambda: rec.predict_video(tmp_path / 'clip.mp4'), DataError,
       'clip.mp4: no such video file'),
      (lambda: rec.predict_video(tmp_path / 'notes.mp4'), DataError,
       'notes.mp4: cannot open video'),
      (lambda: rec.predict_video(tmp_path / 'notes.mp4', every=0),
       ValueError, 'every: 0'),
      (lambda: fer_jax.Recognizer.from_workdir(tmp_path), UsageError,
       'config.json: not found'),
      (lambda: fer_jax.Recognizer.from_workdir(trained[1], tta='mirror'),
       UsageError, "eval.tta: 'mirror'"),
      (lambda: fer_jax.Recognizer.from_workdir(trained[1], detector='haar'),
       UsageError, "predict.detector: 'haar'")]:
    with pytest.raises(error, match=message):
      call()


def test_train_and_evaluate_are_the_modes_calls(trained):
  config, workdir, metrics = trained
  # A finished run: its test report, as training wrote it; nothing written.
  assert fer_jax.train(config, str(workdir))['accuracy'] == metrics[
      'accuracy']
  with pytest.raises(UsageError, match="--split: 'dev'"):
    fer_jax.evaluate(str(workdir), 'dev')
  # Plain functions, not the modules of the same concern.
  assert inspect.isfunction(fer_jax.train) and inspect.isfunction(
      fer_jax.evaluate)
  from fer_jax import evaluation, training
  assert fer_jax.train is not training and fer_jax.evaluate is not evaluation
