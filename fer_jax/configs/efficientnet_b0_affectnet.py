"""The reference study's EfficientNet-B0 on AffectNet (Layout A), at 224 px.

Protocol: 20 epochs; train_set split 80/20 into train/test and the released
balanced val_set used as the validation set (`data.validation='released'`).

  python main.py --config=configs/efficientnet_b0_affectnet.py \
      --config.data.root=/path/to/AffectNet --workdir=runs/efficientnet_b0
"""

from fer_jax.configs import resnet18_affectnet


def get_config():
  config = resnet18_affectnet.get_config()
  config.model.name = 'efficientnet_b0'
  config.data.validation = 'released'    # the reference study's protocol
  config.train.num_epochs = 20           # it was still improving at 20
  config.train.early_stopping_patience = 0
  config.model.dropout_rate = 0.2        # torchvision's classifier dropout
  return config
