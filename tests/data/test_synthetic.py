"""The generator writes Layout A like the release, deterministically."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from fer_jax.data import affectnet, faces, index, synthetic
from fer_jax.labels import NUM_CLASSES
from fer_jax.configs import default


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  root = tmp_path_factory.mktemp('synthetic')
  table = synthetic.generate(root, num_train=300, num_val=40, image_size=32,
                             seed=7, va_missing_fraction=0.1,
                             num_processes=2)
  return root, table


def test_files_read_back_to_the_labels_written(written, tmp_path):
  root, table = written
  data = default.get_config().data
  data.index_cache_dir = str(tmp_path)
  for split in ('train_set', 'val_set'):
    records, report = index.to_records(
        affectnet.index_npy(root / split, data), 'raise')
    rows = {str(i): (label, v, a) for s, i, label, v, a in table
            if s == split}
    assert len(records) == len(rows) and not report.skipped
    for path, label, va, mask in zip(records.paths, records.labels,
                                     records.va, records.va_mask):
      want_label, v, a = rows[Path(path).stem]
      assert label == want_label
      assert mask == (v != -2)
      if mask:
        np.testing.assert_allclose(va, (v, a), atol=1e-5)


def test_annotations_are_numpy_strings_and_ids_not_contiguous(written):
  root, table = written
  annotations = root / 'train_set' / 'annotations'
  sample_id = table[0][1]
  for kind in ('exp', 'val', 'aro'):
    value = np.load(annotations / f'{sample_id}_{kind}.npy')
    assert value.dtype.kind == 'U' and value.shape == ()
  assert np.load(annotations / f'{sample_id}_lnd.npy').shape == (136,)
  ids = sorted(i for _, i, *_ in table)
  assert len(set(ids)) == len(ids)
  assert ids[-1] - ids[0] + 1 > len(ids)  # gaps, like the release
  with Image.open(root / 'train_set' / 'images' / f'{sample_id}.jpg') as im:
    assert im.format == 'JPEG' and im.size == (32, 32)


def test_class_frequencies_follow_affectnet_and_val_is_balanced(written):
  _, table = written
  train = np.bincount([r[2] for r in table if r[0] == 'train_set'],
                      minlength=NUM_CLASSES)
  val = np.bincount([r[2] for r in table if r[0] == 'val_set'],
                    minlength=NUM_CLASSES)
  freq = synthetic.TRAIN_CLASS_FREQUENCIES / synthetic.TRAIN_CLASS_FREQUENCIES.sum()
  np.testing.assert_allclose(train / train.sum(), freq, atol=0.01)
  assert train.min() >= 1 and train[1] == train.max()  # Happy most common
  assert set(val) == {5}
  missing = np.mean([r[3] == -2 for r in table])
  assert 0.05 < missing < 0.15  # va_missing_fraction=0.1


def test_generation_is_deterministic_whatever_the_process_count(tmp_path):
  digests = []
  for processes in (1, 2):
    root = tmp_path / str(processes)
    synthetic.generate(root, num_train=24, num_val=8, image_size=32, seed=3,
                       va_missing_fraction=0.1, num_processes=processes)
    files = sorted(p for p in root.rglob('*') if p.is_file())
    digests.append({str(p.relative_to(root)):
                    hashlib.sha1(p.read_bytes()).hexdigest() for p in files})
  assert digests[0] == digests[1]
  assert len(digests[0]) == 32 * 5


def test_colour_and_position_do_not_reveal_the_class():
  # Mean colour and brightness centroid of 400 balanced faces: a linear
  # classifier on them must stay near chance (1/8), unlike on geometry.
  features, labels = [], []
  for label in range(NUM_CLASSES):
    for k in range(50):
      params = faces.draw_params(np.random.default_rng([1, label, k]), label)
      jpeg, _ = faces.render(params, 32)
      image = np.asarray(Image.open(__import__('io').BytesIO(jpeg)),
                         np.float64)
      gray = image.mean(-1)
      ys, xs = np.mgrid[:32, :32]
      features.append([*image.mean((0, 1)), *image.std((0, 1)),
                       (gray * xs).sum() / gray.sum(),
                       (gray * ys).sum() / gray.sum()])
      labels.append(label)
  x, y = np.array(features), np.array(labels)
  x = (x - x.mean(0)) / x.std(0)
  train = np.arange(len(y)) % 2 == 0
  clf = LogisticRegression(max_iter=2000).fit(x[train], y[train])
  assert clf.score(x[~train], y[~train]) < 0.3


def test_valence_and_arousal_shape_the_drawing():
  # Same identity and class, higher valence: the mouth corners rise.
  rng = lambda: np.random.default_rng([5, 1, 0])
  params = faces.draw_params(rng(), 1)
  low = dict(params, smile=params['smile'] - faces.VALENCE_TO_SMILE * 0.3)
  corner_y = lambda p: faces._face_geometry(p, 64)['mouth_outer'][0, 1]
  assert corner_y(params) < corner_y(low)
  centres = faces.VA_CENTRES
  assert np.all(np.abs(centres) <= 1)
  draws = np.array([[faces.draw_params(np.random.default_rng([2, c, k]), c)[
      key] for key in ('valence', 'arousal')] for c in range(8)
                    for k in range(30)]).reshape(8, 30, 2)
  np.testing.assert_allclose(draws.mean(1), centres, atol=0.08)
