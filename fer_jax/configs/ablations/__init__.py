"""Ablation configs: one base experiment, named variants of it, seeds.

Each file's get_config() returns ablation(base, variants); docs/ablations.md.
"""

import ml_collections

from fer_jax.configs import default, resnet18_affectnet


def base_config(data: str) -> ml_collections.ConfigDict:
  """The experiment the ablations vary.

  'synthetic': the default, shrunk so that an ablation of 9-10 runs
  finishes in under 15 minutes on a 2-core CPU. 'affectnet':
  configs/resnet18_affectnet.py; set --config.base.data.root=PATH.
  """
  if data == 'affectnet':
    return resnet18_affectnet.get_config()
  if data != 'synthetic':
    raise ValueError(f"config argument {data!r}: 'synthetic' or 'affectnet'")
  config = default.get_config()
  # 48 px and 4,000 images instead of the default's 64 px and 7,000: the 9
  # runs of configs/ablations/imbalance.py in under 15 minutes on a 2-core
  # CPU (docs/ablations.md). Accuracy is far lower than the default's; what
  # the ablations compare is the variants against each other.
  config.data.image_size = 48
  config.data.synthetic.num_train = 4000
  return config


def ablation(base: ml_collections.ConfigDict, variants: dict[str, dict],
             seeds: tuple[int, ...] = (0, 1, 2)) -> ml_collections.ConfigDict:
  """An ablation config: `base` trained once per variant and seed.

  variants: {name: {'section.field': value, ...}} in table order; each is
  the base with those fields set. The first is the baseline that the
  others are compared with.
  """
  config = ml_collections.ConfigDict()
  config.base = base                      # --config.base.data.root=... etc.
  config.ablate = ml_collections.ConfigDict()
  # Pairs, not a dict: ConfigDict sorts its keys and refuses dotted ones.
  config.ablate.variants = tuple((name, dict(fields))
                                 for name, fields in variants.items())
  config.ablate.baseline = next(iter(variants))  # differences are to this
  config.ablate.seeds = tuple(seeds)
  # Each seed is written to these fields. train.seed draws the
  # initialisation, data order and augmentation; add 'data.split_seed' to
  # redraw the train/val split as well.
  config.ablate.seed_fields = ('train.seed',)
  # The table's columns (report/test_metrics.json keys); per-class recall
  # gets its own table.
  config.ablate.metrics = ('accuracy', 'balanced_accuracy', 'macro_f1',
                           'valence_ccc', 'arousal_ccc')
  # True: no training; the tables from the runs that have finished.
  config.ablate.collect_only = False
  # True: no training; commands.txt (a command line per run) and
  # slurm_array.sh (a SLURM job array of them) in the workdir.
  config.ablate.plan_only = False
  # 'variant:seed', or several comma-separated: train only those runs,
  # then the tables from whatever has finished. '': every run.
  config.ablate.only = ''
  # Runs trained at once on this host, each in a process of its own.
  config.ablate.parallel_runs = 1
  # GPUs of each of them (CUDA_VISIBLE_DEVICES) when parallel_runs > 1; on
  # a CPU host the runs share the cores.
  config.ablate.devices_per_run = 1
  # A run folder's lock, held while a process trains it, is refreshed every
  # 5 minutes; held from another host and not refreshed for this long, its
  # process is taken to be gone (on the same host its PID says so).
  config.ablate.stale_lock_hours = 2.0
  return config
