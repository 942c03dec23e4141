"""Data sets and splits: which images are train, val and test.

Most layouts ('npy', 'csv', 'folders', 'rafdb'; 'synthetic' is generated
in Layout A) have two released sets, read through the cached index
(fer_jax.data.index): the one split into train and val (or test), and the
released evaluation set. FER2013 and FERPlus release all three splits
(Training, PublicTest, PrivateTest), taken as they are. `data.validation`
selects the reference study's two protocols: 'holdout' (ResNet18): a seeded stratified split of
train_set into train and val (`data.val_fraction`), the released val_set as
the balanced test set;
'released' (EfficientNet-B0): the same split of train_set gives train and
test, and the released val_set is the validation set.
"""

import collections
import hashlib
import os
from pathlib import Path

import ml_collections
import numpy as np
from absl import logging

from fer_jax import distributed, labels
from fer_jax.data import affectnet, fer2013, folders, index, rafdb, synthetic
from fer_jax.data.index import DataError, Records, SourceReport

SPLIT_NAMES = ('train', 'val', 'test')


def stratified_split(labels: np.ndarray, keys: np.ndarray, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices (rest, held out) with `fraction` of every class held out.

  Within a class, examples are ranked by a seeded hash of their key (the
  image's path below the data root), not by position: a file added,
  removed or skipped moves at most one other example across the split, and
  moving the data set's folder moves none.
  """
  ranks = np.array([int.from_bytes(hashlib.blake2b(
      f'{seed}/{key}'.encode(), digest_size=8).digest(), 'big')
                    for key in keys], dtype=np.uint64)
  held = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    members = members[np.argsort(ranks[members], kind='stable')]
    held.append(members[:int(round(fraction * len(members)))])
  held = np.sort(np.concatenate(held)) if held else np.zeros(0, int)
  rest = np.setdiff1d(np.arange(len(labels)), held)
  return rest, held


def relative_paths(paths: np.ndarray, root: Path) -> list[str]:
  """paths below root without it (others unchanged)."""
  prefix = os.path.join(str(root), '')
  return [p[len(prefix):] if p.startswith(prefix) else p for p in paths]


# The two released sets of each layout: the one split into train and val
# (or test), and the released evaluation set. data.train_source and
# data.released_source override them.
DEFAULT_SOURCES = {'npy': ('train_set', 'val_set'),
                   'csv': ('training.csv', 'validation.csv'),
                   'folders': ('train', 'test')}
# Layouts read from one root, whose files name the split of every image.
SPLIT_LAYOUTS = {'rafdb': rafdb.index_rafdb, 'fer2013': fer2013.index_fer2013,
                 'ferplus': fer2013.index_ferplus}
LAYOUTS = ('synthetic', *DEFAULT_SOURCES, *SPLIT_LAYOUTS)


def dataset_root(config: ml_collections.ConfigDict) -> Path:
  """The root of the configured data set, generated if synthetic."""
  if config.data.layout == 'synthetic':
    return synthetic.ensure_dataset(config)
  if config.data.layout not in LAYOUTS:
    raise ValueError(f"data.layout: {config.data.layout!r} is not one of "
                     f"{', '.join(map(repr, LAYOUTS))}")
  if not config.data.root:
    raise ValueError('data.root: empty; point it at the data set '
                     '(--config.data.root=PATH)')
  return Path(config.data.root)


def source_name(data: ml_collections.ConfigDict, which: str) -> str:
  """The folder or file of one released set: which is 'train' or
  'released' (data.train_source, data.released_source or the layout's)."""
  layout = 'npy' if data.layout == 'synthetic' else data.layout
  return data.get(f'{which}_source') or DEFAULT_SOURCES[layout][
      which == 'released']


def folder_classes(data: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The own label space of a class-folders data set: the classes with a
  folder in its train or released set (folders.own_classes)."""
  if not data.root:
    raise ValueError('data.root: empty; point it at the data set '
                     '(--config.data.root=PATH)')
  if not Path(data.root).is_dir():
    raise ValueError(f'data.root: {data.root} is not a folder')
  return folders.own_classes(
      [Path(data.root) / source_name(data, which)
       for which in ('train', 'released')], data.class_folders)


def _index_source(config: ml_collections.ConfigDict, root: Path,
                  which: str) -> dict:
  """The index of one released set: which is 'train' or 'released'."""
  data = config.data
  layout = 'npy' if data.layout == 'synthetic' else data.layout
  name = source_name(data, which)
  if layout == 'npy':
    return affectnet.index_npy(root / name, data)
  if layout == 'csv':
    return affectnet.index_csv(root / name, data, root / data.images_dir)
  return folders.index_folders(root / name, data)


def read_sources(config: ml_collections.ConfigDict, root: Path
                 ) -> dict[str, tuple[Records, SourceReport]]:
  """The records of the layout's released sets, labelled in the run's
  label space: 'train' and 'released' (the evaluation set), or 'train',
  'val' and 'test' where the layout fixes all three."""
  layout = config.data.layout
  if layout in SPLIT_LAYOUTS:
    built = SPLIT_LAYOUTS[layout](root, config.data)
    if 'val' not in built:
      built = {'train': built['train'], 'released': built['test']}
  else:
    built = {which: _index_source(config, root, which)
             for which in ('train', 'released')}
  classes = labels.run_classes(config)
  return {which: index.to_records(one, config.data.on_error, classes)
          for which, one in built.items()}


def _read_sources(config: ml_collections.ConfigDict, root: Path
                  ) -> dict[str, tuple[Records, SourceReport]]:
  """read_sources, its input errors (a missing or malformed label file)
  as DataError: one line for the user, naming the file."""
  try:
    return read_sources(config, root)
  except DataError:
    raise
  except (OSError, ValueError) as e:
    raise DataError(str(e)) from e


def load_splits(config: ml_collections.ConfigDict
                ) -> tuple[dict[str, Records], dict]:
  """The train, val and test records and the data report (docs/datasets.md)."""
  root = dataset_root(config)
  sources = _read_sources(config, root)
  if 'val' in sources:  # the layout's own three splits
    splits = {name: records for name, (records, _) in sources.items()}
    reports = {name: report for name, (_, report) in sources.items()}
    return splits, _data_report(root, splits, reports, config)
  (train_set, train_report), (released, released_report) = (
      sources['train'], sources['released'])
  rest, held = stratified_split(
      train_set.labels, relative_paths(train_set.paths, root),
      config.data.val_fraction, config.data.split_seed)
  if config.data.validation == 'holdout':
    splits = {'train': train_set.subset(rest), 'val': train_set.subset(held),
              'test': released}
    sources = {'train': train_report, 'val': None, 'test': released_report}
  elif config.data.validation == 'released':
    splits = {'train': train_set.subset(rest), 'val': released,
              'test': train_set.subset(held)}
    sources = {'train': train_report, 'val': released_report, 'test': None}
  else:
    raise ValueError(f"data.validation: {config.data.validation!r} is not "
                     "'holdout' or 'released'")
  return splits, _data_report(root, splits, sources, config)


def _data_report(root: Path, splits: dict[str, Records],
                 sources: dict[str, SourceReport | None],
                 config: ml_collections.ConfigDict) -> dict:
  """data_report.json's content; raises if a split is empty."""
  for name, records in splits.items():
    if len(records) == 0:
      raise DataError(f'{root}: split {name!r} has no examples')
  classes = labels.run_classes(config)
  report = {'root': str(root), 'classes': list(classes)}
  report.update({name: split_report(splits[name], sources[name],
                                    len(classes))
                 for name in SPLIT_NAMES})
  for source in sources.values():
    if source is not None and source.skipped:
      logging.warning('%s: skipped %d files (data.on_error=skip), listed in '
                      'data_report.json', root, len(source.skipped))
  return report


def load_splits_all_processes(config: ml_collections.ConfigDict
                              ) -> tuple[dict[str, Records], dict]:
  """load_splits in process 0 first (it generates or indexes the data set);
  the others then read that, and never draw the set again."""
  if not distributed.is_primary():
    config = config.copy_and_resolve_references()
    config.data.synthetic.regenerate = False
  return distributed.primary_first(load_splits, config)


def split_report(records: Records, source: SourceReport | None,
                 num_classes: int) -> dict:
  """Counts of one split; dropped and skipped files where it owns them.

  A released set's dropped and skipped files, and the notes on its images,
  are reported with the split that holds its remaining images (train for
  train_set), as they never reached the stratified split.
  """
  return {
      'num_examples': len(records),
      'num_va_examples': int(records.va_mask.sum()),
      'class_counts': np.bincount(records.labels,
                                  minlength=num_classes).tolist(),
      'dropped_classes': dict(source.dropped_classes) if source else {},
      'skipped': list(source.skipped) if source else [],
      'skipped_by_reason': dict(collections.Counter(
          index.reason_kind(s['reason']) for s in source.skipped))
                           if source else {},
      'image_notes': dict(source.image_notes) if source else {},
  }
