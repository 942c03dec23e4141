"""Run by test_kernels in a process of its own (XLA reads its flags once):
prints the worst relative gradient error, float32 against float64, of
ResNet18's stem, layer1 and the first block of layer2 (model.kernels='cpu',
training-mode BatchNorm, 4 images of 64 px) under the XLA_FLAGS it gets.

With jaxlib 0.10.2, convolutions on Eigen
(`--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`) at LLVM's
optimisation level 0 give gradients 1-10% off, the same on every run; at -O2,
or on YNNPACK (the default) at either level, 1e-5. The failure follows the
HLO's op names (the blocks named layer1_0, ... instead of l1_0, ... agree to
1e-5): by all signs it is how XLA lays the program out around Eigen's
kernels, not their rounding.
"""


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


if __name__ == '__main__':
  print(worst_relative_error())
