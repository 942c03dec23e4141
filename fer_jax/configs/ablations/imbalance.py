"""Class imbalance: no correction, class-weighted cross-entropy, balanced sampling.

The synthetic train_set has AffectNet's class frequencies (Happy 47%,
Contempt 1.3%) and the test split is balanced, as AffectNet's released
val_set is; the per-class recall table shows what each remedy buys the
rare classes. 15 minutes on a 2-core AVX2 CPU (docs/ablations.md).

  python main.py --mode=ablate --config=configs/ablations/imbalance.py
  python main.py --mode=ablate --config=configs/ablations/imbalance.py:affectnet \\
      --config.base.data.root=/path/to/AffectNet --workdir=runs/imbalance_affectnet
"""

from fer_jax.configs.ablations import ablation, base_config


def get_config(data: str = 'synthetic'):
  return ablation(base_config(data), {
      'none': {'data.sampler': 'uniform', 'train.class_weights': 'none'},
      # Cui et al. (2019); beta 0.9999 weights Contempt 33.9x Happy on
      # the synthetic training split (3,199 images: 41 Contempt, 1,495
      # Happy), 3.9x on AffectNet's; inverse frequency about 36x on both.
      'weighted_ce': {'data.sampler': 'uniform',
                      'train.class_weights': 'effective_number',
                      'train.class_weight_beta': 0.9999},
      'balanced_sampler': {'data.sampler': 'balanced',
                           'train.class_weights': 'none'},
  })
