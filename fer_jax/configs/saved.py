"""A run's saved config.json as the config: the same experiment again.

  python main.py --config=configs/saved.py:runs/default/config.json \
      --workdir=runs/default_again

--mode=ablate starts each of its runs this way. Fields can be overridden as
with any config (--config.train.seed=1).
"""

import json

import ml_collections


def get_config(path: str) -> ml_collections.ConfigDict:
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
