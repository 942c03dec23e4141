"""--mode=benchmark: the train step of both models, the pipeline, and both.

The defaults are the CPU comparison of docs/performance.md (batch 32, 112 px,
float32, SGD); benchmarks/gpu_check.sh sets the GPU grid from the command
line.

  python main.py --config=configs/benchmark.py --mode=benchmark \\
      --workdir=runs/benchmark
  python main.py --config=configs/benchmark.py --mode=benchmark \\
      --config.benchmark.models=resnet18 --config.benchmark.dtypes=bfloat16 \\
      --config.benchmark.image_sizes=224 --config.benchmark.batch_sizes=256
"""

import ml_collections

from fer_jax.configs import default


def get_config():
  config = default.get_config()
  config.train.optimizer = 'sgd'          # momentum 0.9, Nesterov, weight decay
  config.train.learning_rate = 0.01

  config.benchmark = ml_collections.ConfigDict()
  config.benchmark.models = ('resnet18', 'efficientnet_b0')
  config.benchmark.batch_sizes = (32,)    # global, split over local devices
  config.benchmark.image_sizes = (112,)
  config.benchmark.dtypes = ('float32',)  # 'float32' | 'bfloat16' compute
  config.benchmark.warmup_steps = 3
  config.benchmark.steps = 10             # timed; the median is reported
  # The Grain pipeline alone and feeding the step, on a small synthetic set
  # drawn at each image size (data.num_workers, data.num_threads apply).
  config.benchmark.pipeline = True
  config.benchmark.pipeline_batches = 10
  config.data.synthetic.num_train = 640
  config.data.synthetic.num_val = 64
  config.data.sampler = 'uniform'
  return config
