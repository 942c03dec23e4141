"""Grain batches: shapes, dtypes, coverage, shuffling and splits."""

import numpy as np
import pytest

from fer_jax import data
from fer_jax.data import images, pipeline
from tests.conftest import NUM_DEVICES


@pytest.fixture(scope='module')
def loaded(data_cache):
  from tests.conftest import tiny_config
  config = tiny_config(data_cache)
  splits, report = data.load_splits(config)
  return config, splits, report


def test_train_batches_are_uint8_sharded_over_devices(loaded):
  config, splits, _ = loaded
  batches = list(pipeline.train_batches(splits['train'], config,
                                        NUM_DEVICES))
  per_device = config.train.batch_size // NUM_DEVICES
  size = config.data.image_size
  assert len(batches) == config.train.num_epochs * (
      len(splits['train']) // config.train.batch_size)
  b = batches[0]
  assert b['image'].shape == (NUM_DEVICES, per_device, size, size, 3)
  assert b['image'].dtype == np.uint8
  assert b['label'].shape == (NUM_DEVICES, per_device)
  assert b['label'].dtype == np.int32
  assert b['va'].shape == (NUM_DEVICES, per_device, 2)
  assert b['va_mask'].dtype == bool and b['mask'].all()


def _identities(labels, va, va_mask):
  """(valence, arousal, label) of the VA-valid examples: unique per image."""
  return [tuple(np.round(v, 5)) + (int(l),)
          for l, v, m in zip(labels, va, va_mask) if m]


def _sampler(loaded, sampler):
  """The train records and a function: epoch -> its examples in order."""
  config, splits, _ = loaded
  config = config.copy_and_resolve_references()
  config.data.sampler = sampler
  records = splits['train']
  steps = pipeline.steps_per_epoch(len(records), config.train.batch_size)
  batches = list(pipeline.train_batches(records, config, NUM_DEVICES))

  def epoch_examples(epoch):
    epoch_batches = batches[epoch * steps:(epoch + 1) * steps]
    return _identities(*(np.concatenate([b[k].reshape(-1, *b[k].shape[2:])
                                         for b in epoch_batches])
                         for k in ('label', 'va', 'va_mask')))
  return records, epoch_examples


def test_uniform_epochs_are_new_permutations_and_reproducible(loaded):
  records, epoch_examples = _sampler(loaded, 'uniform')
  epoch0 = epoch_examples(0)
  assert epoch0 == _sampler(loaded, 'uniform')[1](0)  # same seed, same order
  assert epoch0 != epoch_examples(1)
  # No example twice within an epoch (up to the dropped remainder).
  assert len(set(epoch0)) == len(epoch0)
  assert set(epoch0) <= set(_identities(records.labels, records.va,
                                        records.va_mask))


def test_balanced_sampler_draws_classes_equally_and_reproducibly(loaded):
  records, epoch_examples = _sampler(loaded, 'balanced')
  epoch0 = epoch_examples(0)
  assert epoch0 == _sampler(loaded, 'balanced')[1](0)
  assert epoch0 != epoch_examples(1)
  # Many epochs of the sampler alone: each class close to 1/8.
  draws = np.concatenate([pipeline.balanced_indices(
      records.labels, len(records), np.random.default_rng(k))
                          for k in range(200)])
  freq = np.bincount(records.labels[draws], minlength=8) / len(draws)
  np.testing.assert_allclose(freq, 1 / 8, atol=0.01)
  natural = np.bincount(records.labels, minlength=8) / len(records)
  assert natural.max() > 0.4  # Happy dominates the unbalanced split


def test_eval_batches_cover_every_example_once_with_padding_masked(loaded):
  config, splits, _ = loaded
  records = splits['val']
  batches = list(pipeline.eval_batches(records, config, NUM_DEVICES))
  masks = np.concatenate([b['mask'].reshape(-1) for b in batches])
  labels = np.concatenate([b['label'].reshape(-1) for b in batches])
  assert masks.sum() == len(records)
  assert len(masks) % config.train.eval_batch_size == 0
  np.testing.assert_array_equal(labels[masks], records.labels)


@pytest.mark.parametrize('sampler', ['uniform', 'balanced'])
def test_each_process_reads_its_rows_of_every_global_batch(loaded, sampler):
  """2 processes x 2 devices: process p's batches are rows p*B/2..(p+1)*B/2
  of the 1-process batches, augmentation included, whole run long."""
  config, splits, _ = loaded
  config = config.copy_and_resolve_references()
  config.data.sampler = sampler
  records = splits['train']
  whole = list(pipeline.train_batches(records, config, 4))
  shares = [list(pipeline.train_batches(records, config, 2, 0, p, 2))
            for p in (0, 1)]
  assert len(shares[0]) == len(shares[1]) == len(whole)
  for step, batch in enumerate(whole):
    for key in batch:
      rows = np.concatenate([share[step][key] for share in shares])
      np.testing.assert_array_equal(rows, batch[key], err_msg=key)
  # A mid-run start gives the same rows.
  later = next(pipeline.train_batches(records, config, 2, 5, 1, 2))
  np.testing.assert_array_equal(later['image'], shares[1][5]['image'])


@pytest.mark.parametrize('count', [21, 32, 3])
def test_processes_evaluate_disjoint_shares_in_equal_batch_counts(
    loaded, count):
  """Every example once across 2 processes, padding masked, and the same
  number of batches in each (the evaluation step is collective)."""
  config, splits, _ = loaded
  records = splits['train'].subset(np.arange(count))
  shares = [list(pipeline.eval_batches(records, config, 2, p, 2))
            for p in (0, 1)]
  assert len(shares[0]) == len(shares[1])
  labels, va, masks = ([np.concatenate([b[k].reshape(-1, *b[k].shape[2:])
                                        for b in share]) for share in shares]
                       for k in ('label', 'va', 'mask'))
  assert masks[0].sum() + masks[1].sum() == count
  np.testing.assert_array_equal(
      np.concatenate([labels[0][masks[0]], labels[1][masks[1]]]),
      records.labels)
  np.testing.assert_array_equal(
      np.concatenate([va[0][masks[0]], va[1][masks[1]]]), records.va)


def test_batches_that_do_not_split_over_processes_are_refused(loaded):
  config, splits, _ = loaded
  with pytest.raises(ValueError, match=r'train.batch_size: 8 .* 16 devices'):
    pipeline.train_batches(splits['train'], config, 4, 0, 0, 4)
  with pytest.raises(ValueError, match=r'train.eval_batch_size: 16 .* 32'):
    pipeline.eval_batches(splits['val'], config, 8, 0, 4)


def test_augmentation_only_in_training(loaded):
  """With only the flip on, training shows the image or its mirror."""
  config, splits, _ = loaded
  config = config.copy_and_resolve_references()
  config.train.num_epochs = 8
  config.train.batch_size = 1
  config.data.sampler = 'uniform'
  config.data.augment.update(dict(
      crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), rotation_degrees=0.0,
      brightness=0.0, contrast=0.0, saturation=0.0, erasing_prob=0.0))
  records = splits['train'].subset(np.arange(1))
  image = images.load(records.paths[0], config.data.image_size)
  eval_image = next(pipeline.eval_batches(records, config, 1))['image'][0, 0]
  np.testing.assert_array_equal(eval_image, image)
  seen = {b['image'][0, 0].tobytes()
          for b in pipeline.train_batches(records, config, 1)}
  assert seen == {image.tobytes(), image[:, ::-1].tobytes()}
  config.data.augment.erasing_prob = 1.0
  erased = next(pipeline.train_batches(records, config, 1))['image'][0, 0]
  assert (erased != image).any() and (erased != image[:, ::-1]).any()


def _take(batches, count: int) -> list[dict]:
  return [next(batches) for _ in range(count)]


def _same(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize('num_workers', [0, 2])
def test_iterator_state_and_start_step_resume_the_exact_batches(
    loaded, num_workers):
  """Across an epoch boundary; Grain worker processes included."""
  config, splits, _ = loaded
  config = config.copy_and_resolve_references()
  config.data.num_workers = num_workers
  records = splits['train']
  steps = pipeline.steps_per_epoch(len(records), config.train.batch_size)
  batches = pipeline.train_batches(records, config, NUM_DEVICES)
  _take(batches, steps - 2)
  state = batches.get_state()
  want = _take(batches, 4)  # the last two of epoch 1, the first of epoch 2
  batches.close()
  restored = pipeline.train_batches(records, config, NUM_DEVICES)
  restored.set_state(state)
  _same(_take(restored, 4), want)
  restored.close()
  started = pipeline.train_batches(records, config, NUM_DEVICES,
                                   start_step=steps - 2)
  _same(_take(started, 4), want)
  started.close()


def test_holdout_split_is_stratified_and_disjoint(loaded):
  config, splits, report = loaded
  train, val = splits['train'], splits['val']
  assert not set(train.paths) & set(val.paths)
  counts = np.bincount(train.labels, minlength=8) + np.bincount(
      val.labels, minlength=8)
  expected_val = np.round(config.data.val_fraction * counts)
  np.testing.assert_array_equal(np.bincount(val.labels, minlength=8),
                                expected_val)
  assert report['test']['class_counts'] == [4] * 8  # released val_set
  for name in ('train', 'val', 'test'):
    assert set(report[name]) == {'num_examples', 'num_va_examples',
                                 'class_counts', 'dropped_classes', 'skipped',
                                 'skipped_by_reason', 'image_notes'}


def test_released_protocol_uses_val_set_for_validation(loaded):
  config, splits, _ = loaded
  config = config.copy_and_resolve_references()
  config.data.validation = 'released'
  released, _ = data.load_splits(config)
  np.testing.assert_array_equal(released['val'].paths, splits['test'].paths)
  np.testing.assert_array_equal(released['test'].paths, splits['val'].paths)


def test_split_moves_at_most_one_other_example_when_a_file_goes():
  """Ranks by a hash of the path: a removed file reshuffles nothing."""
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 8, 2000)
  keys = np.array([f'train_set/images/{i}.jpg' for i in range(2000)])
  _, held = data.stratified_split(labels, keys, 0.2, 0)
  keep = np.arange(2000) != 123
  _, held_after = data.stratified_split(labels[keep], keys[keep], 0.2, 0)
  before, after = set(keys[held]) - {keys[123]}, set(keys[keep][held_after])
  assert len(before ^ after) <= 1
  _, other_seed = data.stratified_split(labels, keys, 0.2, 1)
  assert len(set(held) ^ set(other_seed)) > 100


def test_decoded_images_held_in_memory_give_the_same_batches(loaded):
  """Decoded once (data.cache_decoded_mb) or in every epoch: the same
  augmented training batches and evaluation batches, to the bit."""
  config, splits, _ = loaded
  held = pipeline.hold_decoded(splits, config.data)
  size = config.data.image_size
  for name, records in splits.items():
    assert held[name].images.shape == (len(records), size, size, 3)
    np.testing.assert_array_equal(
        held[name].images[3], pipeline.load_image(records[3], config.data))
  for make in (pipeline.train_batches, pipeline.eval_batches):
    for decoded, each_epoch in zip(make(held['train'], config, NUM_DEVICES),
                                   make(splits['train'], config,
                                        NUM_DEVICES)):
      for key in each_epoch:
        np.testing.assert_array_equal(decoded[key], each_epoch[key])
  # 0 MB: nothing is held.
  small = config.data.copy_and_resolve_references()
  small.cache_decoded_mb = 0
  assert pipeline.hold_decoded(splits, small)['train'].images is None
