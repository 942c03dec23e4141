"""oneDNN's convolution for JAX on CPU through jax.ffi (a prototype).

conv(x, w, stride, padding) computes what xla_conv does, i.e.
lax.conv_general_dilated with NHWC inputs and HWIO kernels, for float32:
square stride, symmetric zero padding, no groups, no bias. Forward,
backward-data and backward-weights are oneDNN primitives (jax.custom_vjp).
Works under jit and pmap, not under vmap. If the library cannot be loaded,
one line on stderr says so and conv is XLA's convolution.

Environment:
  DNNL_CONV_LIB   the library build.sh made (default: the extension that
                  `pip install ./pkg` installed, else libdnnl_conv.so here).
  DNNL_CONV_WANY  0: oneDNN takes the HWIO weights as they are; 1: it picks
                  its own layout and the weights are reordered on each call;
                  auto (default): 0 when C_in <= 4 (the RGB stem), else 1.
"""

import ctypes
import functools
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

TARGETS = ('dnnl_conv_fwd', 'dnnl_conv_bwd_data', 'dnnl_conv_bwd_weights')


def library_path() -> str:
  """The shared library to load (see the module docstring)."""
  if os.environ.get('DNNL_CONV_LIB'):
    return os.environ['DNNL_CONV_LIB']
  spec = importlib.util.find_spec('_dnnl_conv')
  if spec is not None and spec.origin:
    return spec.origin
  return os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'libdnnl_conv.so')


def _load(path):
  """The library with its FFI targets registered, or None."""
  try:
    lib = ctypes.CDLL(path)
    for name in TARGETS:
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)),
                                  platform='cpu')
    return lib
  except Exception as e:  # pylint: disable=broad-except
    print(f'dnnl_conv: oneDNN convolution unavailable ({e}); using XLA\'s',
          file=sys.stderr)
    return None


LIB_PATH = library_path()
LIB = _load(LIB_PATH)
AVAILABLE = LIB is not None
VERSION = LIB.dnnl_conv_version() if AVAILABLE else None  # 30200 = 3.2.0
WANY = os.environ.get('DNNL_CONV_WANY', 'auto')


def xla_conv(x: jax.Array, w: jax.Array, stride: int,
             padding: int) -> jax.Array:
  """XLA's convolution: the reference and the fallback."""
  return jax.lax.conv_general_dilated(
      x, w, (stride, stride), [(padding, padding)] * 2,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _attrs(stride, padding, wany):
  return dict(stride=np.int64(stride), pad=np.int64(padding),
              wany=np.int64(wany))


def _forward(x, w, stride, padding, wany):
  n, h, width, _ = x.shape
  kh, kw, _, features = w.shape
  out = ((h + 2 * padding - kh) // stride + 1,
         (width + 2 * padding - kw) // stride + 1)
  y = jax.ShapeDtypeStruct((n, *out, features), jnp.float32)
  return jax.ffi.ffi_call('dnnl_conv_fwd', y)(
      x, w, **_attrs(stride, padding, wany))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, stride, padding, wany):
  return _forward(x, w, stride, padding, wany)


def _conv_fwd(x, w, stride, padding, wany):
  return _forward(x, w, stride, padding, wany), (x, w)


def _conv_bwd(stride, padding, wany, residuals, dy):
  x, w = residuals
  attrs = _attrs(stride, padding, wany)
  dx = jax.ffi.ffi_call('dnnl_conv_bwd_data',
                        jax.ShapeDtypeStruct(x.shape, jnp.float32))(
                            dy, w, **attrs)
  dw = jax.ffi.ffi_call('dnnl_conv_bwd_weights',
                        jax.ShapeDtypeStruct(w.shape, jnp.float32))(
                            x, dy, **attrs)
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv(x: jax.Array, w: jax.Array, stride: int = 1, padding: int = 0,
         wany: int | None = None) -> jax.Array:
  """oneDNN's convolution of NHWC x with HWIO w (XLA's if not float32)."""
  if not AVAILABLE or x.dtype != jnp.float32 or w.dtype != jnp.float32:
    return xla_conv(x, w, stride, padding)
  if wany is None:
    wany = int(w.shape[2] > 4) if WANY == 'auto' else int(WANY)
  return _conv(x, w, int(stride), int(padding), int(wany))


dnnl_conv = conv  # the prototype's name
