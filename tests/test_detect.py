"""BlazeFace on real photographs: faces where there are faces, none where
there are none, boxes where OpenCV's Haar cascade puts them."""

import cv2
import numpy as np
import pytest

from fer_jax import detect
from fer_jax.data import images


def _rgb(path) -> np.ndarray:
  return images.decode(path.read_bytes(), str(path))


def _haar_box(image: np.ndarray) -> np.ndarray:
  """OpenCV's frontal-face Haar cascade: an independent detector."""
  cascade = cv2.CascadeClassifier(
      cv2.data.haarcascades + 'haarcascade_frontalface_default.xml')
  found = cascade.detectMultiScale(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY),
                                   1.1, 5, minSize=(40, 40))
  assert len(found) == 1
  return found[0].astype(float)


@pytest.fixture(scope='module', params=['blazeface_full', 'blazeface_short'])
def detector(request):
  return request.param, detect.create_detector(request.param, 0.6, 20)


@pytest.mark.parametrize('name', ['astronaut', 'hopper'])
def test_one_face_where_the_haar_cascade_finds_it(detector, photos, name):
  image = _rgb(photos[name])
  faces = detector[1](image)
  assert len(faces) == 1 and 0.6 <= faces[0].score < 1
  # Detectors draw face boxes a little differently: overlap, not equality.
  assert detect.iou(faces[0].box, _haar_box(image)[None])[0] > 0.6
  x, y, w, h = faces[0].box
  eyes = faces[0].keypoints[:2]
  assert np.all((eyes >= [x, y]) & (eyes <= [x + w, y + h / 2 + 1]))
  # The person's right eye is on the picture's left.
  assert eyes[0, 0] < eyes[1, 0]


@pytest.mark.parametrize('name', ['cat', 'coffee', 'rocket'])
def test_no_face_in_photos_without_one(detector, photos, name):
  assert detector[1](_rgb(photos[name])) == []


def test_boxes_are_in_the_pixels_of_the_image(detector, photos):
  """Padding a photo moves its face box by the padding; doubling the
  photo's size doubles the box (letterboxing undone exactly)."""
  image = _rgb(photos['astronaut'])
  face = detector[1](image)[0]
  canvas = np.zeros((560, 600, 3), np.uint8)
  canvas[30:542, 70:582] = image
  moved = detector[1](canvas)[0]
  # Within the detector's own jitter between two resamplings.
  np.testing.assert_allclose(moved.box[:2] - face.box[:2], [70, 30], atol=4)
  np.testing.assert_allclose(moved.box[2:], face.box[2:], rtol=0.05)
  doubled = detector[1](cv2.resize(image, (1024, 1024)))[0]
  np.testing.assert_allclose(doubled.box, 2 * face.box, rtol=0.01)
  np.testing.assert_allclose(doubled.keypoints, 2 * face.keypoints,
                             rtol=0.01)


def test_boxes_are_clipped_to_the_image():
  np.testing.assert_allclose(detect.clip_box(
      np.array([-10.0, 5, 40, 200]), 100, 120), [0, 5, 30, 115])
  np.testing.assert_allclose(detect.clip_box(
      np.array([20.0, 30, 10, 10]), 100, 120), [20, 30, 10, 10])


def test_letterbox_shrinks_before_it_pads(monkeypatch):
  """A wide photo's padding is added at the detector's size, not at the
  photo's (225 MB more for a 50-megapixel photo); its content maps back
  to the image's pixels within a pixel of the small square."""
  padded = []
  pad = cv2.copyMakeBorder
  monkeypatch.setattr(cv2, 'copyMakeBorder',
                      lambda image, *a, **k: padded.append(image.shape) or
                      pad(image, *a, **k))
  image = np.zeros((300, 600, 3), np.uint8)
  image[100:200, 400:500] = 255
  pixels, side, origin = detect.letterbox(image, 128)
  assert padded == [(64, 128, 3)] and pixels.shape == (128, 128, 3)
  assert side == 600
  assert (pixels[:32] == -1).all() and (pixels[96:] == -1).all()
  ys, xs = np.nonzero(pixels[..., 0] > 0)
  box = (np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) *
         side / 128 + np.r_[origin, origin])
  np.testing.assert_allclose(box, [400, 100, 500, 200], atol=side / 128)


def test_min_face_size_and_score_filter(detector, photos):
  name, _ = detector
  image = _rgb(photos['astronaut'])
  assert detect.create_detector(name, 0.6, 120)(image) == []
  assert detect.create_detector(name, 0.99, 20)(image) == []


def test_weighted_nms_merges_overlaps_by_score():
  boxes = np.array([[0, 0, 10, 10], [1, 0, 10, 10], [50, 50, 10, 10.]])
  scores = np.array([0.9, 0.6, 0.7])
  keypoints = np.arange(3 * 12, dtype=float).reshape(3, 6, 2)
  faces = detect.weighted_nms(boxes, scores, keypoints)
  assert [f[1] for f in faces] == [0.9, 0.7]  # best first, own scores
  np.testing.assert_allclose(faces[0][0], [0.4, 0, 10, 10])  # 0.6 x 1 / 1.5
  np.testing.assert_allclose(faces[0][2], (0.9 * keypoints[0] +
                                           0.6 * keypoints[1]) / 1.5)
  np.testing.assert_allclose(faces[1][0], boxes[2])


def test_weighted_nms_drops_boxes_without_area():
  """A best detection of zero width or height has no IoU with itself: it
  is no face (it had ended predict's whole run with an IndexError)."""
  boxes = np.array([[5, 5, 0, 10], [0, 0, 10, 10], [3, 3, 10, -1],
                    [50, 50, np.nan, 10]])
  scores = np.array([0.95, 0.8, 0.9, 0.99])
  faces = detect.weighted_nms(boxes, scores, np.zeros((4, 6, 2)))
  assert len(faces) == 1 and faces[0][1] == 0.8
  np.testing.assert_allclose(faces[0][0], boxes[1])


def test_anchors_match_the_models_outputs():
  for name, (_, size, layout) in detect.MODELS.items():
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=str(detect.model_file(name)))
    counts = {d['shape'][1] for d in interpreter.get_output_details()}
    assert counts == {len(detect.anchor_centres(size, layout))}
