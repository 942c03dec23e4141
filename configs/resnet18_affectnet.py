"""The reference study's ResNet18 on AffectNet (Layout A), at 224 px.

Protocol: train_set split 80/20 (stratified, seeded) into train/val, 10
epochs, a checkpoint each epoch, the best by validation macro F1 kept, early
stopping; the released val_set (balanced) is the test set.

  python main.py --config=configs/resnet18_affectnet.py \
      --config.data.root=/path/to/AffectNet --workdir=runs/resnet18_affectnet
"""

from configs import default


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
  config.train.num_epochs = 10           # as in the reference study
  config.train.batch_size = 256
  config.train.eval_batch_size = 512
  config.train.learning_rate = 1e-3
  config.train.warmup_epochs = 1
  config.train.early_stopping_patience = 3
  config.train.log_every_steps = 50
  return config
