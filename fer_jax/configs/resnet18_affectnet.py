"""The reference study's ResNet18 on AffectNet (Layout A), at 224 px.

Protocol: train_set split 80/20 (stratified, seeded) into train/val, 10
epochs, a checkpoint each epoch, the best by validation macro F1 kept, early
stopping; the released val_set (balanced) is the test set.

  python main.py --config=configs/resnet18_affectnet.py \
      --config.data.root=/path/to/AffectNet --workdir=runs/resnet18_affectnet
"""

from fer_jax.configs import default


def get_config():
  config = default.get_config()
  config.data.layout = 'npy'
  config.data.root = ''                  # required: --config.data.root=...
  config.data.image_size = 224           # the release's face crops
  config.data.num_workers = 8            # JPEG decoding at 224 px needs processes
  config.data.num_threads = 4
  # Photographs have redundancy the synthetic faces lack; random erasing
  # is the usual occlusion augmentation (Zhong et al., 2020). Untested here.
  config.data.augment.erasing_prob = 0.25
  # The reference study fine-tuned ImageNet weights: point this at
  # torchvision's resnet18-f37072fd.pth (docs/api.md: pretrained weights).
  config.model.init_from = ''
  # Class imbalance (Happy 47%, Contempt 1.3%): each image once per epoch,
  # with class-weighted cross-entropy by the effective number of samples
  # (Cui et al., 2019); beta 0.9999 weights Contempt 3.9x Happy on the
  # 80% of AffectNet's train_set that trains (3.2x on all of it), where
  # inverse frequency would weight it 36x.
  config.data.sampler = 'uniform'
  config.train.class_weights = 'effective_number'
  config.train.class_weight_beta = 0.9999
  # MSE and 1 - CCC for valence/arousal: CCC is what the literature
  # reports (Toisoul et al., 2021 train EmoNet with it).
  config.train.va_loss = 'mse+ccc'
  config.train.num_epochs = 10           # as in the reference study
  config.train.batch_size = 256
  config.train.eval_batch_size = 512
  config.train.learning_rate = 1e-3
  config.train.warmup_epochs = 1
  config.train.early_stopping_patience = 3
  config.train.log_every_steps = 50
  return config
