"""Run by test_steps in a process of its own with 4 simulated CPU devices:
prints how far the first train step on 4 devices is from the one on 1
(test_steps.first_step_differences), as JSON."""

import json
import os
import sys
from pathlib import Path

from tests.conftest import tiny_config, xla_flags

os.environ['XLA_FLAGS'] = xla_flags(4)
os.environ['JAX_PLATFORMS'] = 'cpu'
from tests.test_steps import first_step_differences, fixed_batch, run_steps  # noqa: E402,E501

if __name__ == '__main__':
  config = tiny_config(Path(sys.argv[1]))
  config.train.va_loss = sys.argv[2]
  batch = fixed_batch(16, config.data.image_size)
  print(json.dumps(first_step_differences(
      *(run_steps(config, batch, d, 1) for d in (1, 4)))))
