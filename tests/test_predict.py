"""--mode=predict: face crops of any size and colour mode, real photos
with faces found, videos, and inputs that give no face."""

import csv
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from fer_jax import data, detect, inference, predict, recognizer, video
from fer_jax.data import images
from fer_jax.config_rules import UsageError
from fer_jax.labels import EXPRESSIONS


def test_predictions_match_evaluation_and_broken_files_are_skipped(
    finished, tmp_path, capsys):
  config, workdir, _ = finished
  config = config.copy_and_resolve_references()  # the session's, shared
  config.predict.detector = 'none'
  splits, _ = data.load_splits(config)
  test = splits['test']
  folder = tmp_path / 'faces'
  (folder / 'nested').mkdir(parents=True)
  for i in range(6):  # the test split's own files, byte for byte
    shutil.copy(test.paths[i], folder / f'{i}{Path(test.paths[i]).suffix}')
  # Another size and a grayscale image: resized and converted.
  Image.open(test.paths[6]).resize((50, 50)).save(folder / 'nested' / 'big.jpg')
  Image.open(test.paths[7]).convert('L').save(folder / 'nested' / 'gray.jpg')
  (folder / 'broken.jpg').write_bytes(b'not an image')
  whole = open(test.paths[8], 'rb').read()  # OpenCV would decode half of it
  (folder / 'cut.jpg').write_bytes(whole[:len(whole) // 2])
  # Named with a reason, not ignored: other suffixes (an animated GIF, a
  # HEIC photo, a 3GP video, no suffix); hidden files are left alone.
  for name in ('notes.txt', 'anim.gif', 'photo.heic', 'clip.3gp', 'README',
               '.DS_Store'):
    (folder / name).write_bytes(b'\0' * 64)
  output = predict.predict(config, str(workdir), str(folder))
  rows = list(csv.DictReader(open(output)))
  names = [r['path'].split('faces/')[1] for r in rows]
  assert names[6:] == ['nested/big.jpg', 'nested/gray.jpg'] and len(rows) == 8
  assert list(rows[0].keys()) == predict.header()
  assert [(r['face'], r['score'], r['frame']) for r in rows] == [
      ('0', '', '')] * 8
  assert [float(rows[6][k]) for k in 'xywh'] == [0, 0, 50, 50]
  probs = np.array([[float(row[f'prob_{name}']) for name in EXPRESSIONS]
                    for row in rows])
  va = np.array([[float(row['valence']), float(row['arousal'])]
                 for row in rows])
  np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
  assert [int(row['expression_id']) for row in rows] == list(
      probs.argmax(1))
  # Evaluation's path (evaluate.evaluate's) on the same six images.
  trained_config = inference.trained_config(config, workdir)
  state, p_eval, _ = inference.restore(trained_config, workdir, None)
  evaluated = inference.predict_records(p_eval, state,
                                        test.subset(np.arange(6)),
                                        trained_config)
  order = [int(Path(name).stem) for name in names[:6]]
  np.testing.assert_allclose(probs[:6], evaluated['probs'][order], atol=1e-6)
  np.testing.assert_allclose(va[:6], evaluated['va'][order], atol=1e-6)
  out = capsys.readouterr().out
  assert 'Skipped 7 inputs' in out
  assert 'broken.jpg' in out and 'cut.jpg' in out
  skipped = {r['path'].split('faces/')[1]: r['reason'] for r in
             csv.DictReader(open(output.parent / 'skipped.csv'))}
  assert sorted(skipped) == ['README', 'anim.gif', 'broken.jpg', 'clip.3gp',
                             'cut.jpg', 'notes.txt', 'photo.heic']
  assert '.gif is neither an image (.jpg' in skipped['anim.gif']
  assert 'no suffix is neither' in skipped['README']


def test_predict_single_file_and_missing_input(finished, tmp_path):
  config, workdir, _ = finished
  config = config.copy_and_resolve_references()  # the session's, shared
  config.predict.detector = 'none'
  splits, _ = data.load_splits(config)
  output = predict.predict(config, str(workdir), splits['test'].paths[0])
  assert len(list(csv.DictReader(open(output)))) == 1
  with pytest.raises(UsageError, match='--input: .*nowhere'):
    predict.predict(config, str(workdir), str(tmp_path / 'nowhere'))


def _exif_turned(source: Path, target: Path) -> None:
  """A phone photo: source's pixels stored turned a quarter to the left,
  with EXIF orientation 6 saying to turn them back to show them."""
  image = Image.open(source).convert('RGB')
  exif = Image.Exif()
  exif[0x0112] = 6
  image.transpose(Image.Transpose.ROTATE_90).save(target, exif=exif,
                                                  quality=95)


def _real_video(photos, path: Path) -> None:
  """12 frames at 10 frames/s: a window sliding over the astronaut's
  portrait (frames 0-5), then over Grace Hopper's (6-11)."""
  astronaut, hopper = (np.array(Image.open(photos[k]).convert('RGB'))
                       for k in ('astronaut', 'hopper'))
  frames = [astronaut[40:440, 16 * i:16 * i + 400] for i in range(6)]
  frames += [hopper[16 * i:16 * i + 400, 56:456] for i in range(6)]
  out = video.writer(path, 10.0, (400, 400))
  for frame in frames:
    out.write(frame[:, :, ::-1].copy())
  out.release()


def test_faces_in_photos_and_video_one_row_each_bad_inputs_named(
    finished, photos, tmp_path, capsys):
  config, workdir, _ = finished
  config = config.copy_and_resolve_references()
  config.predict.annotate = True
  folder = tmp_path / 'photos'
  folder.mkdir()
  for name in ('astronaut', 'hopper', 'cat'):
    shutil.copy(photos[name], folder / f'{name}{photos[name].suffix}')
  _exif_turned(photos['hopper'], folder / 'phone.jpg')
  upright = ImageOps.exif_transpose(Image.open(folder / 'phone.jpg'))
  upright.save(folder / 'phone_upright.png')  # the same pixels, turned
  whole = photos['hopper'].read_bytes()
  (folder / 'cut.jpg').write_bytes(whole[:len(whole) // 2])
  (folder / 'notes.mp4').write_text('not a video')
  _real_video(photos, folder / 'walk.mp4')
  output = predict.predict(config, str(workdir), str(folder))
  rows = {}
  for row in csv.DictReader(open(output)):
    rows.setdefault(Path(row['path']).name, []).append(row)
  assert sorted(rows) == ['astronaut.png', 'hopper.jpg', 'phone.jpg',
                          'phone_upright.png', 'walk.mp4']
  box = lambda row: np.array([float(row[k]) for k in 'xywh'])
  # Photos: one face each, the detector's box in the shown image.
  detector = detect.create_detector(config.predict.detector,
                                    config.predict.min_score,
                                    config.predict.min_face_size)
  face, = detector(np.array(Image.open(photos['astronaut']).convert('RGB')))
  row, = rows['astronaut.png']
  np.testing.assert_allclose(box(row), face.box, atol=0.06)
  assert (row['face'], row['frame']) == ('0', '')
  assert abs(float(row['score']) - face.score) < 1e-4
  # The EXIF-turned photo is read upright: as its upright copy.
  turned, = rows['phone.jpg']
  straight, = rows['phone_upright.png']
  np.testing.assert_allclose(box(turned), box(straight), atol=0.06)
  probs = lambda row: np.array([float(row[f'prob_{n}']) for n in EXPRESSIONS])
  # Not to the bit: the JPEG's face is decoded at training's reduced DCT
  # scale, the PNG's at full size (a few hundredths apart here).
  assert turned['expression'] == straight['expression']
  np.testing.assert_allclose(probs(turned), probs(straight), atol=0.05)
  # The video: a row per frame, times from the frame rate, two tracks.
  walk = rows['walk.mp4']
  assert [int(r['frame']) for r in walk] == list(range(12))
  assert [float(r['time_s']) for r in walk] == pytest.approx(
      [i / 10 for i in range(12)])
  assert [r['track'] for r in walk] == ['0'] * 6 + ['1'] * 6
  xs = [box(r)[0] for r in walk[:6]]  # the window slides right: face left
  assert all(a > b for a, b in zip(xs, xs[1:]))
  # Every input without a face is named, with its reason.
  skipped = {Path(p).name: reason for p, reason in
             csv.reader(open(output.parent / 'skipped.csv'))}
  assert set(skipped) == {'path', 'cat.png', 'cut.jpg', 'notes.mp4'}
  assert 'no face found' in skipped['cat.png']
  assert 'cannot open video' in skipped['notes.mp4']
  assert 'not a readable image' in skipped['cut.jpg']
  assert 'Skipped 3 inputs' in capsys.readouterr().out
  # Annotated copies: the photos as shown, the video's 12 frames.
  annotated = output.parent / 'annotated'
  phone = cv2.imread(str(annotated / 'phone.jpg.jpg'))
  assert phone.shape[:2] == (upright.height, upright.width)
  capture = cv2.VideoCapture(str(annotated / 'walk.mp4.mp4'))
  assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 12
  capture.release()
  assert not (annotated / 'cat.png.jpg').exists()


@pytest.mark.parametrize('name', ['astronaut', 'hopper'])  # PNG, JPEG
def test_crops_are_cut_as_training_cuts_face_boxes(trained, photos, name):
  """A detected face is cropped as images.load crops a face box of the
  'csv' layout (the square, the margin, the resize; a JPEG decoded at the
  same reduced scale), pixel for pixel."""
  config = trained[0].copy_and_resolve_references()
  config.data.face_margin = 0.25
  detector = detect.create_detector('blazeface_full', 0.6, 20)
  crop, = predict.image_crops(photos[name], config, detector,
                              predict.Tally())
  loaded = images.load(str(photos[name]), config.data.image_size,
                       crop.box, 0.25)
  np.testing.assert_array_equal(crop.image, loaded)


def test_detector_none_reports_and_crops_the_image_as_shown(trained,
                                                             tmp_path):
  """A PNG whose EXIF (which OpenCV does not read in PNGs) turns it a
  quarter: its box is the turned size, its crop the turned image."""
  config = trained[0].copy_and_resolve_references()
  pixels = np.random.default_rng(1).integers(0, 256, (20, 30, 3), np.uint8)
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(pixels).save(tmp_path / 'turned.png', exif=exif)
  crop, = predict.image_crops(tmp_path / 'turned.png', config, None,
                              predict.Tally())
  assert crop.box.tolist() == [0, 0, 20, 30]
  np.testing.assert_array_equal(crop.image, images.resize(
      images.turned(pixels, 6), config.data.image_size))


def test_rows_are_written_as_they_come_and_crop_is_empty_unless_saved(
    finished, tmp_path, monkeypatch):
  """40 images, batches of 16: when the last is read, the two batches
  before it are rows in the temporary file already."""
  config, workdir, _ = finished
  config = config.copy_and_resolve_references()
  config.predict.detector = 'none'
  folder, rng = tmp_path / 'images', np.random.default_rng(0)
  folder.mkdir()
  for i in range(40):
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(
        folder / f'{i:02}.png')
  written = []

  def image_crops(path, *args):
    if path.name == '39.png':
      temporary, = workdir.glob('report/predict/*/.predictions.csv.*.tmp')
      written.append(len(temporary.read_text().splitlines()) - 1)
    return image_crops_(path, *args)

  image_crops_ = predict.image_crops
  monkeypatch.setattr(predict, 'image_crops', image_crops)
  rows = list(csv.DictReader(open(predict.predict(config, str(workdir),
                                                  str(folder)))))
  assert written == [32] and len(rows) == 40
  assert {r['crop'] for r in rows} == {''}


def test_saved_crops_are_the_pixels_the_model_was_given(finished, photos,
                                                        tmp_path):
  config, workdir, _ = finished
  config = config.copy_and_resolve_references()
  config.predict.save_crops = True
  folder = tmp_path / 'inputs'
  (folder / 'nested').mkdir(parents=True)
  shutil.copy(photos['astronaut'], folder / 'astronaut.png')
  shutil.copy(photos['hopper'], folder / 'nested' / 'hopper.jpg')
  _real_video(photos, folder / 'walk.mp4')
  output = predict.predict(config, str(workdir), str(folder))
  rows = list(csv.DictReader(open(output)))
  assert [r['crop'] for r in rows[:2]] == [
      'crops/astronaut.png-0.png', 'crops/nested/hopper.jpg-0.png']
  assert [r['crop'] for r in rows[2:]] == [
      f'crops/walk.mp4-f{i}-0.png' for i in range(12)]
  crops = np.stack([np.asarray(Image.open(output.parent / r['crop']))
                    for r in rows])
  rec = recognizer.Recognizer.from_workdir(workdir)
  size = config.data.image_size
  assert crops.shape == (14, size, size, 3) and crops.dtype == np.uint8
  probs = np.array([[float(r[f'prob_{name}']) for name in EXPRESSIONS]
                    for r in rows])
  np.testing.assert_allclose(rec.predict_crops(crops)['probs'], probs,
                             atol=1e-6)
  # framing: how each face was cut, as the recognizer says.
  cut, = recognizer.file_crops(folder / 'astronaut.png', rec.config,
                               rec.detector, rec.contract)
  assert rows[0]['framing'] == cut.framing
  assert {r['framing'] for r in rows} <= {'aligned', 'box', 'whole'}


def test_an_empty_folder_gives_an_empty_table_and_a_reason(
    finished, tmp_path):
  config, workdir, _ = finished
  (tmp_path / 'empty').mkdir()
  output = predict.predict(config, str(workdir), str(tmp_path / 'empty'))
  assert list(csv.reader(open(output))) == [predict.header()]
  (path, reason), = list(csv.reader(open(output.parent / 'skipped.csv')))[1:]
  assert path.endswith('empty') and 'no images' in reason
