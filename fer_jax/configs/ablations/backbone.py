"""Backbone: ResNet18 against EfficientNet-B0, from scratch or pretrained.

From scratch by default (nothing can be downloaded here). Pretrained
variants are added for the weights passed after the data set's name,
torchvision's ImageNet files for instance (docs/api.md: Models and
pretrained weights):

  python main.py --mode=ablate --config=configs/ablations/backbone.py
  python main.py --mode=ablate \\
      --config=configs/ablations/backbone.py:affectnet,resnet18=/w/resnet18-f37072fd.pth,efficientnet_b0=/w/efficientnet_b0_rwightman-7f5810bc.pth \\
      --config.base.data.root=/path/to/AffectNet --workdir=runs/backbone_affectnet
"""

from fer_jax.configs.ablations import ablation, base_config


def get_config(arg: str = 'synthetic'):
  data, *weights = arg.split(',')
  variants = {'resnet18': {'model.name': 'resnet18'},
              'efficientnet_b0': {'model.name': 'efficientnet_b0'}}
  for name, path in (w.split('=', 1) for w in weights):
    if name not in variants:
      raise ValueError(f'config argument {name}={path}: not one of '
                       f'{list(variants)}')
    variants[f'{name}_pretrained'] = {'model.name': name,
                                      'model.init_from': path}
  return ablation(base_config(data), variants, seeds=(0, 1))
