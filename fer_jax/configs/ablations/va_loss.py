"""Valence/arousal loss: MSE, 1 - CCC, both, and the weight of the VA term.

CCC is the metric the literature reports and MSE the usual loss; their sum
is what configs/resnet18_affectnet.py trains with (docs/ablations.md).

  python main.py --mode=ablate --config=configs/ablations/va_loss.py
  python main.py --mode=ablate --config=configs/ablations/va_loss.py:affectnet \\
      --config.base.data.root=/path/to/AffectNet --workdir=runs/va_loss_affectnet
"""

from fer_jax.configs.ablations import ablation, base_config


def get_config(data: str = 'synthetic'):
  return ablation(base_config(data), {
      'mse': {'train.va_loss': 'mse', 'train.va_loss_weight': 1.0},
      'ccc': {'train.va_loss': 'ccc', 'train.va_loss_weight': 1.0},
      'mse+ccc': {'train.va_loss': 'mse+ccc', 'train.va_loss_weight': 1.0},
      'mse+ccc_x3': {'train.va_loss': 'mse+ccc', 'train.va_loss_weight': 3.0},
  }, seeds=(0, 1))
