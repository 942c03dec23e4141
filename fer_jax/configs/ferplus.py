"""FERPlus (8 expressions; FER2013's images relabelled by 10 annotators each).

ROOT/fer2013new.csv (the votes) beside ROOT/fer2013.csv (the pixels), rows
in the same order, or the folders FERPlus's script generates from them
(ROOT/FER2013Train/, FER2013Valid/, FER2013Test/ with their label.csv);
FER2013's Training, PublicTest and PrivateTest splits.
data.ferplus_labels: the paper's four training modes, as its own scripts
make them: 'majority' (the standard protocol), 'probability' (a label
drawn each epoch from the kept votes), 'crossentropy' (the kept votes as
the target) or 'multi_target' (every expression with 30% of the votes,
loss -log max(t * p)); validation and test are always scored on the
majority label (docs/datasets.md).

The recipe follows the FERPlus paper (Barsoum et al., 2016) and its
repository (github.com/microsoft/FERPlus): 64 px, momentum SGD (0.9) at
0.05, halved after 20 epochs and lowered again after 40, batch 32, 100
epochs at most; their VGG13 becomes ResNet18 here. Published FERPlus
accuracies (as reported): 88-92%.

  python main.py --config=configs/ferplus.py --config.data.root=/path/to/ferplus \
      --workdir=runs/ferplus
"""

from fer_jax.configs import fer2013


def get_config():
  config = fer2013.get_config()
  config.data.layout = 'ferplus'
  config.data.classes = 'ferplus'        # FERPlus's order: Neutral, ..., Contempt
  config.data.ferplus_labels = 'majority'
  config.data.image_size = 64
  config.data.augment.erasing_prob = 0.0
  config.train.learning_rate = 0.05
  config.train.step_decay_epochs = (20, 40)
  config.train.step_decay_factor = 0.5
  config.train.num_epochs = 100
  config.train.batch_size = 32
  return config
