"""Why XLA:CPU's convolutions stay on YNNPACK: a wrong gradient on Eigen at -O0.

  python -m benchmarks.xla_cpu_eigen_o0

ResNet18's stem, layer1 and the first block of layer2 (model.kernels='cpu',
training-mode BatchNorm, 4 images of 64 px), the gradient of sum(sin(y))
in float32 against float64, under four XLA_FLAGS settings, each in a child
process (XLA reads its flags once). With jaxlib 0.10.2, convolutions on
Eigen (`--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`,
1.07-1.12x faster on the default step) at LLVM's optimisation level 0 (the
tests' setting) give gradients 1-10% off, the same on every run; at the
default level, or on YNNPACK at either level, they agree to 1e-5
(BENCHMARKS.md). The failure hangs on names: with the blocks named
layer1_0, layer1_1 and layer2_0 instead of l1_0, l1_1 and l2 (the same
arithmetic; only the HLO's op names change, and with them XLA's order of
ops and buffers) every setting agrees to 1e-5. So it is not the rounding
of Eigen's kernels but, by all signs, how the program is laid out around
them. Rerun on a new jaxlib before trying Eigen again.
"""

import os
import subprocess
import sys

EIGEN = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'
SETTINGS = {'YNNPACK (default), O2': '',
            'YNNPACK (default), O0': '--xla_backend_optimization_level=0',
            'Eigen, O2': EIGEN,
            'Eigen, O0': f'{EIGEN} --xla_backend_optimization_level=0'}


def worst_relative_error() -> float:
  """The largest, over gradient leaves, of max |f32 - f64| / max |f64|."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from fer_jax.models import layers, resnet

  class Front(nn.Module):
    dtype: object

    @nn.compact
    def __call__(self, x):
      conv, norm = layers.torch_style_layers(self.dtype, True, 0.9, 1e-5,
                                             None, 'cpu')
      x = conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name='conv1')(x)
      x = layers.max_pool(nn.relu(norm(name='bn1')(x)), 3, 2, 1)
      for block in range(2):
        x = resnet.BasicBlock(64, 1, conv, norm, name=f'l1_{block}')(x)
      return resnet.BasicBlock(128, 2, conv, norm, name='l2')(x)

  x = np.random.default_rng(0).normal(size=(4, 64, 64, 3)).astype(np.float32)
  variables = jax.tree.map(np.asarray, jax.jit(Front(jnp.float32).init)(
      jax.random.PRNGKey(0), x))

  def gradient(dtype):
    cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)

    def loss(params, x):
      y, _ = Front(dtype).apply({**cast(variables), 'params': params}, x,
                                mutable=['batch_stats'])
      return jnp.sum(jnp.sin(y))
    return jax.jit(jax.grad(loss, (0, 1)))(cast(variables['params']),
                                           cast(x))

  low = jax.tree.leaves(gradient(jnp.float32))
  jax.config.update('jax_enable_x64', True)
  high = jax.tree.leaves(gradient(jnp.float64))
  return max(float(np.abs(np.asarray(a, np.float64) - b).max()
                   / np.abs(b).max()) for a, b in zip(low, high))


def main() -> None:
  if len(sys.argv) > 1 and sys.argv[1] == '--child':
    print(worst_relative_error())
    return
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for name, flags in SETTINGS.items():
    env = {**os.environ, 'XLA_FLAGS': flags, 'JAX_PLATFORMS': 'cpu',
           'PYTHONPATH': root}
    done = subprocess.run([sys.executable, __file__, '--child'], env=env,
                          capture_output=True, text=True, check=True)
    print(f'{name:24s} worst relative gradient error '
          f'{float(done.stdout.split()[-1]):.1e}')


if __name__ == '__main__':
  main()
