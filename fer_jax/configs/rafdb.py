"""RAF-DB basic (7 expressions) from its official files, ResNet18 at 224 px.

ROOT/EmoLabel/list_patition_label.txt and ROOT/Image/aligned/ (the 100 px
aligned faces, upsampled to 224 as published code does). The train_/test_
prefix gives train (12,271 images) and test (3,068); validation is a
seeded, stratified 10% of train, where published code often selects on the
test set.

The recipe follows DAN's published RAF-DB script (Wen et al., 2023,
github.com/yaoing/DAN): 224 px, SGD with momentum 0.9 and weight decay
1e-4, learning rate 0.1 divided by 10 every 10 epochs, 40 epochs, batch 256;
horizontal flip, rotation and random erasing (area 0.02-0.25). It starts
from ImageNet weights (model.init_from); DAN starts from MS-Celeb-1M.
Published RAF-DB accuracies (as reported): ResNet-18 baselines about 87%,
DAN 89.7, POSTER++ 92.2.

  python main.py --config=configs/rafdb.py --config.data.root=/path/to/raf-basic \
      --config.model.init_from=/path/to/resnet18-f37072fd.pth --workdir=runs/rafdb
"""

from fer_jax.configs import default


def get_config():
  config = default.get_config()
  config.data.layout = 'rafdb'
  config.data.root = ''                  # required: --config.data.root=...
  config.data.classes = 'rafdb'          # RAF-DB's order: Surprise, ..., Neutral
  config.data.rafdb_images = 'aligned'
  config.data.image_size = 224
  config.data.val_fraction = 0.1
  config.data.sampler = 'uniform'
  config.data.num_workers = 4
  config.data.augment.rotation_degrees = 20.0
  config.data.augment.erasing_prob = 0.5
  config.data.augment.erasing_scale = (0.02, 0.25)
  config.model.init_from = ''            # torchvision's resnet18-f37072fd.pth
  config.train.optimizer = 'sgd'
  config.train.learning_rate = 0.1
  config.train.momentum = 0.9
  config.train.weight_decay = 1e-4
  config.train.warmup_epochs = 0.0
  config.train.schedule = 'step'
  config.train.step_decay_epochs = (10, 20, 30)
  config.train.step_decay_factor = 0.1
  config.train.num_epochs = 40
  config.train.batch_size = 256
  config.train.eval_batch_size = 512
  config.train.best_metric = 'val_accuracy'  # what RAF-DB papers report
  config.train.log_every_steps = 10
  return config
