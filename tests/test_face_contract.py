"""The face contract: what a run records of its training faces, and the
faces predict cuts by it, on sets made from real photographs (scikit-
image's astronaut and camera, matplotlib's Grace Hopper) with a known
keypoint template and known transforms."""

import csv
import json
import logging
import math

import cv2
import numpy as np
import onnxruntime  # CI installs it (requirements-nodeps.txt)
import pytest
from PIL import Image

import fer_jax
from fer_jax import (detect, export, face_contract, framing, predict,
                     recognizer)
from fer_jax.configs import default
from fer_jax.data import images
from fer_jax.errors import UsageError
from tests import face_sets
from tests.face_sets import (FER_TEMPLATE, RAF_TEMPLATE, TURNS, aligned_set,
                             apply, turned)

SIZE = 64


@pytest.fixture(scope='module')
def detectors() -> dict:
  return {name: detect.create_detector(name, 0.5, 0.0)
          for name in detect.MODELS}


@pytest.fixture(scope='module')
def faces(photos, detectors) -> dict:
  """{name: (RGB photo, its face's 4 keypoints)}; camera's face is turned
  aside, so its keypoints are only used grey."""
  return face_sets.photo_faces(photos, detectors['blazeface_full'])


def _config(layout: str = 'rafdb'):
  config = default.get_config()
  config.data.layout, config.data.image_size = layout, SIZE
  # The layout's own; a folders set's are its folders'.
  config.data.classes = 'affectnet8' if layout == 'folders' else ''
  return config


@pytest.fixture(scope='module')
def raf_contract(faces, detectors) -> dict:
  """The contract of a RAF-DB-style set: 100 px aligned faces, upright."""
  aligned = aligned_set(faces, RAF_TEMPLATE, 100, 24)
  return face_contract.build(
      _config(), face_sets.records(len(aligned)),
      lambda i: images.resize(aligned[i], SIZE),
      {'blazeface_full': detectors['blazeface_full']})


def test_an_upright_set_gives_a_level_template_where_its_faces_are(
    raf_contract):
  c = raf_contract
  assert c['geometry'] == 'dataset_crop' and c['colour'] == 'rgb'
  assert c['calibration']['found'] == c['calibration']['sampled'] == 24
  assert c['alignment']['roll'] == 'level'
  template = np.array([c['alignment']['template'][p]
                       for p in face_contract.POINTS])
  np.testing.assert_allclose(template, RAF_TEMPLATE, atol=0.04)
  face_contract.check(c, 'contract')


@pytest.mark.parametrize('name', ['astronaut', 'hopper'])
def test_turned_faces_are_warped_level_onto_the_template_by_both_detectors(
    raf_contract, faces, detectors, name):
  """The known transform of each face, then the warp predict applies:
  the eye line within 3 degrees of level, every keypoint within 5% of
  the side of the template, whichever detector found the face."""
  config = _config()
  for degrees, scale, shift in TURNS:
    photo, truth = turned(*faces[name], degrees, scale, shift)
    placed = {}
    for detector_name, detector in detectors.items():
      crop, = recognizer.array_crops(photo, config, detector, raf_contract)
      assert crop.framing == 'aligned' and crop.image.shape == (SIZE,
                                                                SIZE, 3)
      points = apply(crop.matrix, truth)
      assert abs(face_contract.roll_degrees(points)) < 3, (detector_name,
                                                           degrees)
      np.testing.assert_array_less(np.abs(points / SIZE - RAF_TEMPLATE),
                                   0.05)
      placed[detector_name] = points
    np.testing.assert_array_less(
        np.abs(placed['blazeface_full'] - placed['blazeface_short']) / SIZE,
        0.05)


def test_a_set_that_varies_in_roll_keeps_a_faces_roll(faces, detectors):
  """Faces turned up to 20 degrees in training: predict matches scale and
  position only, so a turned face stays turned as they were."""
  rng = np.random.default_rng(1)
  aligned = []
  for k in range(16):
    angle = math.radians(rng.uniform(-20, 20))
    rotation = np.array([[math.cos(angle), -math.sin(angle)],
                         [math.sin(angle), math.cos(angle)]])
    aligned += aligned_set(faces, (RAF_TEMPLATE - 0.5) @ rotation.T + 0.5,
                            100, 1, (('astronaut', 'hopper')[k % 2],))
  contract = face_contract.build(
      _config('folders'), face_sets.records(16), lambda i: images.resize(
          aligned[i], SIZE), {'blazeface_full': detectors['blazeface_full']})
  assert contract['alignment']['roll'] == 'keep'
  assert contract['alignment']['roll_spread_degrees'] > 6
  photo, truth = turned(*faces['astronaut'], 15, 1.0, (0, 0))
  crop, = recognizer.array_crops(photo, _config(), detectors[
      'blazeface_full'], contract)
  assert crop.matrix[0, 1] == 0 and crop.matrix[1, 0] == 0  # no rotation
  roll = face_contract.roll_degrees(truth)
  assert abs(roll) > 10
  assert face_contract.roll_degrees(apply(crop.matrix, truth)) == \
      pytest.approx(roll)


@pytest.mark.parametrize('layout', ['fer2013', 'folders'])
def test_grey_faces_give_grey_crops_framed_as_the_sets_faces(
    faces, detectors, layout):
  """FER2013-style: 48 px grey faces. Grey by the layout, or by the data
  (every sampled face grey); colour photos are served grey, framed as the
  set's faces (camera's, a face turned aside, only grey)."""
  grey = [face_contract.to_grey(f) for f in aligned_set(
      faces, FER_TEMPLATE, 48, 16)]
  contract = face_contract.build(
      _config(layout), face_sets.records(16),
      lambda i: images.resize(grey[i], SIZE),
      {'blazeface_full': detectors['blazeface_full']})
  assert contract['colour'] == 'grey'
  assert contract['colour_source'] == (
      'the fer2013 layout' if layout == 'fer2013'
      else '16 of 16 sampled training faces are grey')
  for name in ('astronaut', 'hopper', 'camera'):
    photo, truth = turned(*faces[name], 12, 1.0, (0, 0))
    crop, = recognizer.array_crops(photo, _config(), detectors[
        'blazeface_full'], contract)
    assert crop.framing == 'aligned'
    assert (crop.image == crop.image[:, :, :1]).all()
    if name != 'camera':
      np.testing.assert_array_less(
          np.abs(apply(crop.matrix, truth) / SIZE - FER_TEMPLATE), 0.05)


def test_a_colour_set_stays_colour(raf_contract):
  assert raf_contract['colour'] == 'rgb'
  assert raf_contract['colour_source'] == ('0 of 24 sampled training faces '
                                           'are grey')


def test_to_grey_is_rounded_luma_and_leaves_grey_alone():
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (50, 40, 3), np.uint8)
  want = np.floor(rgb.astype(np.float64) @ [0.299, 0.587, 0.114] + 0.5)
  grey = face_contract.to_grey(rgb)
  np.testing.assert_array_equal(grey[..., 1], want)
  assert (grey == grey[..., :1]).all()
  np.testing.assert_array_equal(face_contract.to_grey(grey), grey)
  assert face_contract.is_grey(grey) and not face_contract.is_grey(rgb)


def test_degenerate_keypoints_fall_back_to_the_box(raf_contract, faces):
  """NaN keypoints, or all on one spot: the box, said in `framing`."""
  image = faces['astronaut'][0]
  box = np.array([178.0, 81.0, 94.0, 94.0])
  for keypoints in (np.full((6, 2), np.nan), np.full((6, 2), 220.0)):
    fake = lambda _: [detect.Face(box, 0.9, keypoints)]
    crop, = recognizer.array_crops(image, _config(), fake, raf_contract)
    assert crop.framing == 'box'
    np.testing.assert_array_equal(crop.image, images.face_crop(
        image, box, raf_contract['margin'], SIZE))


def test_too_few_faces_found_falls_back_to_the_box_convention(faces):
  """The detector finding nothing in the sample: no template, the log and
  the contract say so, and predict cuts boxes."""
  contract = face_contract.build(
      _config(), face_sets.records(10),
      lambda i: faces['astronaut'][0][:64, :64],
      {'blazeface_full': lambda image: []})
  assert contract['alignment'] is None
  assert 'found a face in 0 of 10 sampled training faces (under 50%)' in \
      contract['calibration']['note']
  face_contract.check(contract, 'contract')
  box = np.array([178.0, 81.0, 94.0, 94.0])
  fake = lambda _: [detect.Face(box, 0.9, faces['astronaut'][1])]
  crop, = recognizer.array_crops(faces['astronaut'][0], _config(), fake,
                                 contract)
  assert crop.framing == 'box'


def test_a_box_set_is_framed_as_its_crops_whichever_detector(
    faces, detectors, tmp_path):
  """Annotated boxes 1.3 times the full-range detector's, a tenth of it
  lower. The training crops' keypoint template frames a new photo's face
  as they frame it with either detector, whose boxes differ; each
  detector's box relation is recorded, the fallback for a face without
  usable keypoints."""
  paths, boxes = [], []
  for k, name in enumerate(('astronaut', 'hopper') * 2):
    image = faces[name][0][k:, k * 3:]
    paths.append(str(tmp_path / f'{k}.png'))
    cv2.imwrite(paths[-1], cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    box = detectors['blazeface_full'](image)[0].box
    centre = box[:2] + box[2:] / 2 + [0, 0.1 * box[2]]
    boxes.append([*(centre - 0.65 * box[2:]), *(1.3 * box[2:])])
  records = face_sets.records(4, np.array(boxes), paths)
  config = _config('csv')
  contract = face_contract.build(config, records, lambda i: images.load(
      paths[i], SIZE, records.boxes[i], 0.1), detectors)
  face_contract.check(contract, 'contract')
  assert contract['geometry'] == 'box' and contract['alignment']
  full = contract['box_calibration']['blazeface_full']
  assert abs(full['scale'] - 1.3) < 0.05 and full['found'] == 4
  np.testing.assert_allclose(full['offset'], [0, 0.1], atol=0.03)
  # Where the training crop of a new photo put its keypoints (upright:
  # these crops' roll rule is 'level', AffectNet's would keep a roll).
  photo, truth = turned(*faces['hopper'], 0, 0.8, (30, -20))
  box = detectors['blazeface_full'](photo)[0].box
  centre = box[:2] + box[2:] / 2 + [0, 0.1 * box[2]]
  training = framing.region_matrix(images.face_region(
      [*(centre - 0.65 * box[2:]), *(1.3 * box[2:])], 0.1), SIZE)
  for name, detector in detectors.items():
    crop, = recognizer.array_crops(photo, config, detector, contract)
    assert crop.framing == 'aligned'
    np.testing.assert_array_less(np.abs(
        apply(crop.matrix, truth) - apply(training, truth)) / SIZE, 0.05)
    fake = lambda _: [detect.Face(box, 0.9, np.full((6, 2), np.nan))]
    fake.name = name
    crop, = recognizer.array_crops(photo, config, fake, contract)
    assert crop.framing == 'box'
    np.testing.assert_allclose(crop.matrix, framing.region_matrix(
        images.face_region(framing.training_box(box, contract[
            'box_calibration'][name]), 0.1), SIZE))


def test_fit_similarity_recovers_a_known_transform():
  rng = np.random.default_rng(3)
  points = rng.uniform(0, 100, (4, 2))
  angle, scale, shift = 0.4, 0.7, np.array([5.0, -3.0])
  linear = scale * np.array([[math.cos(angle), -math.sin(angle)],
                             [math.sin(angle), math.cos(angle)]])
  matrix = framing.fit_similarity(points, points @ linear.T + shift)
  np.testing.assert_allclose(matrix, np.c_[linear, shift], atol=1e-9)
  level = framing.fit_similarity(points, points * 2 + 1, rotate=False)
  np.testing.assert_allclose(level, [[2, 0, 1], [0, 2, 1]], atol=1e-9)


def test_a_shrinking_warp_puts_a_point_where_its_matrix_says():
  """A bright disc, shrunk 6x and turned: its centroid in the crop is the
  matrix's image of its centre (continuous pixel coordinates)."""
  image = np.zeros((600, 600, 3), np.uint8)
  cv2.circle(image, (301, 251), 30, (255, 255, 255), -1)
  centre = np.array([301.5, 251.5])  # the disc of pixel (301, 251)
  angle = math.radians(30)
  linear = np.array([[math.cos(angle), -math.sin(angle)],
                     [math.sin(angle), math.cos(angle)]]) / 6
  matrix = np.c_[linear, np.array([32.0, 32.0]) - linear @ [300, 300]]
  crop = framing.warp(image, matrix, 64)[..., 0].astype(float)
  ys, xs = np.mgrid[:64, :64] + 0.5
  got = np.array([(xs * crop).sum(), (ys * crop).sum()]) / crop.sum()
  np.testing.assert_allclose(got, apply(matrix, centre), atol=0.25)


# --- the record ------------------------------------------------------------

def _broken(contract: dict, change) -> dict:
  contract = json.loads(json.dumps(contract))
  change(contract)
  return contract


BROKEN = {
    'version': lambda c: c.pop('version'),
    'geometry': lambda c: c.update(geometry='circle'),
    'colour': lambda c: c.update(colour='sepia'),
    'resize': lambda c: c.update(resize='nearest'),
    'image_size': lambda c: c.update(image_size='64'),
    'margin': lambda c: c.update(margin=-1),
    'mean_rgb': lambda c: c.update(mean_rgb=[0.5, 0.5]),
    'std_rgb': lambda c: c.update(std_rgb=[0.2, 0, 0.2]),
    'classes': lambda c: c.update(classes=[]),
    'alignment': lambda c: c.pop('alignment'),
    'alignment.roll': lambda c: c['alignment'].update(roll='spin'),
    'alignment.template.nose_tip': lambda c: c['alignment'][
        'template'].pop('nose_tip'),
    'alignment.template.left_eye': lambda c: c['alignment'][
        'template'].update(left_eye=[float('nan'), 0.4]),
    'box_calibration': lambda c: c.pop('box_calibration'),
}
BROKEN_BOXES = {
    'box_calibration': {'haar': {'scale': 1, 'offset': [0, 0]}},
    'box_calibration.blazeface_full.scale': {'blazeface_full': {
        'scale': 0, 'offset': [0, 0]}},
    'box_calibration.blazeface_short.offset': {'blazeface_short': {
        'scale': 1.2, 'offset': [0]}},
}


@pytest.mark.parametrize('field', sorted(BROKEN))
def test_a_broken_contract_is_refused_naming_its_field(raf_contract, field):
  with pytest.raises(UsageError, match=f'contract.json: {field}:'):
    face_contract.check(_broken(raf_contract, BROKEN[field]),
                        'contract.json')


def test_contract_of_other_kinds_and_a_version_from_the_future(raf_contract):
  with pytest.raises(UsageError, match='not a JSON object'):
    face_contract.check([raf_contract], 'x')
  with pytest.raises(UsageError, match='version: 2 is not 1'):
    face_contract.check({**raf_contract, 'version': 2}, 'x')
  for field, boxes in BROKEN_BOXES.items():
    with pytest.raises(UsageError, match=f'x: {field}:'):
      face_contract.check({**raf_contract, 'box_calibration': boxes}, 'x')
  same = {**raf_contract, 'alignment': {**raf_contract['alignment'],
          'template': {p: [0.5, 0.5] for p in face_contract.POINTS}}}
  with pytest.raises(UsageError, match='all one spot'):
    face_contract.check(same, 'x')


def test_a_run_records_its_contract_and_predict_reads_it(trained):
  config, workdir, _ = trained
  contract = json.loads((workdir / face_contract.FILE).read_text())
  face_contract.check(contract, 'x')
  assert contract['geometry'] == 'dataset_crop'
  assert contract['image_size'] == config.data.image_size
  report = json.loads((workdir / 'data_report.json').read_text())
  assert report['face_contract']['calibration'] == contract['calibration']
  assert fer_jax.Recognizer.from_workdir(workdir).contract == contract


def test_a_run_without_a_contract_keeps_the_box_convention_with_a_warning(
    finished, caplog):
  _, workdir, _ = finished
  (workdir / face_contract.FILE).unlink()
  with caplog.at_level(logging.WARNING):
    rec = fer_jax.Recognizer.from_workdir(workdir)
  assert 'no face contract' in caplog.text
  assert rec.contract['geometry'] == 'box' and not rec.contract['alignment']


def test_a_broken_contract_in_a_run_is_refused_at_the_door(finished):
  _, workdir, _ = finished
  path = workdir / face_contract.FILE
  contract = json.loads(path.read_text())
  path.write_text(json.dumps({**contract, 'colour': 'sepia'}))
  with pytest.raises(UsageError, match="colour: 'sepia' is not one of"):
    fer_jax.Recognizer.from_workdir(workdir)
  path.write_text('{"version": 1,')
  with pytest.raises(UsageError, match='unreadable'):
    fer_jax.Recognizer.from_workdir(workdir)


def test_a_grey_export_fed_model_jsons_crop_agrees_with_predict(
    finished, photos):
  """A grey run: predict's saved crop is grey; the Recognizer gives
  predict's numbers (1e-6); the exported ONNX graph, fed that crop or its
  colour original, gives them within export's tolerance, turning colour
  grey itself; model.json states the whole contract."""
  config, workdir, _ = finished
  path = workdir / face_contract.FILE
  colour = json.loads(path.read_text())
  contract = {**colour, 'colour': 'grey'}
  path.write_text(json.dumps(contract))
  config = config.copy_and_resolve_references()
  config.predict.save_crops = True
  output = predict.predict(config, workdir, str(photos['astronaut']))
  row, = csv.DictReader(output.open())
  crop = np.asarray(Image.open(output.parent / row['crop']).convert('RGB'))
  assert (crop == crop[..., :1]).all() and row['framing'] == 'aligned'
  classes = contract['classes']
  want = np.array([float(row[f'prob_{c}']) for c in classes])
  face, = fer_jax.Recognizer.from_workdir(workdir).predict(
      photos['astronaut'])
  np.testing.assert_allclose([face.probs[c] for c in classes], want,
                             atol=1e-6)
  folder = export.export(config, workdir)
  info = json.loads((folder / 'model.json').read_text())
  assert info['face_contract'] == contract
  assert 'grey' in info['input']['colour'] and 'grey' in info['crop']
  rgb, = recognizer.file_crops(photos['astronaut'], config,
                               detect.create_detector('blazeface_full', 0.6,
                                                      20), colour)
  assert not face_contract.is_grey(rgb.image)
  np.testing.assert_array_equal(face_contract.to_grey(rgb.image), crop)
  session = onnxruntime.InferenceSession(str(folder / 'model.onnx'))
  got = [session.run(['probs'], {'images': image[None]})[0][0]
         for image in (crop, rgb.image)]
  np.testing.assert_array_equal(got[0], got[1])
  np.testing.assert_allclose(got[0], want, atol=export.TOLERANCE)
