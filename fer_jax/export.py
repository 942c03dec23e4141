"""--mode=export: a trained model as ONNX and as a serialized jax.export
(StableHLO) artifact, to run without fer_jax.

Both read uint8 RGB images [B, S, S, 3] (any B; S: the run's
data.image_size), normalise them inside the graph as evaluation does, and
return probs [B, 8] (softmax), logits [B, 8] and va [B, 2]: the checkpoint's
EMA weights when the run kept them, computed in float32 with the library's
convolutions (the same parameters as every model.kernels). They go with a
model.json to report/export/model-step<N>/, beside the run's record; an
export is never overwritten. ONNX needs the packages of
requirements-nodeps.txt; the StableHLO artifact needs JAX alone.
"""

import contextlib
import itertools
import logging as py_logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax import lax
from jax.extend import core

from fer_jax import (config_rules, face_contract, files, inference, models,
                     steps)
from fer_jax.config_rules import UsageError
from fer_jax.labels import run_classes

INPUT_NAME = 'images'
OUTPUT_NAMES = ('probs', 'logits', 'va')
STABLEHLO_FILE = 'model.jax_export'
ONNX_FILE = 'model.onnx'
INFO_FILE = 'model.json'
# jax.export lowers for both, so the artifact also runs under a CUDA jaxlib.
PLATFORMS = ('cpu', 'cuda')
# The oldest that suffice, for older runtimes too (onnxruntime 1.14+).
ONNX_OPSET, ONNX_IR_VERSION = 17, 8
INSTALL = 'pip install --no-deps -r requirements-nodeps.txt'
# The largest difference allowed between onnxruntime's outputs and JAX's.
TOLERANCE = 1e-4
CHECK_BATCH_SIZE = 3  # random images that export checks ONNX with
# Call primitives whose jaxprs the ONNX trace inlines: {name: param}.
_INLINED = {'jit': 'jaxpr', 'pjit': 'jaxpr', 'closed_call': 'call_jaxpr',
            'custom_jvp_call': 'call_jaxpr', 'custom_vjp_call': 'call_jaxpr'}


def export_model_config(config: ml_collections.ConfigDict
                        ) -> ml_collections.ConfigDict:
  """config.model as exported: float32, the library's convolutions."""
  model = ml_collections.ConfigDict(config.model.to_dict())
  model.kernels, model.dtype = 'library', 'float32'
  return model


def grey_images(images: jax.Array) -> jax.Array:
  """uint8 RGB [..., 3] as face_contract.to_grey makes them, exactly:
  every product and sum is an integer below 2^24, so float32 is exact."""
  weights = jnp.asarray(face_contract.LUMA_WEIGHTS, jnp.float32)
  luma = jnp.floor((images.astype(jnp.float32) @ weights + 500) / 1000)
  return jnp.repeat(luma[..., None], 3, axis=-1).astype(jnp.uint8)


def serving_fn(config: ml_collections.ConfigDict, variables: dict,
               contract: dict | None = None
               ) -> Callable[[jax.Array], tuple]:
  """uint8 images [B, S, S, 3] -> (probs, logits, va), as eval_step
  computes them without test-time augmentation; variables are constants.
  A grey face contract's graph turns the images grey itself."""
  model = models.create_model(export_model_config(config),
                              num_classes=len(run_classes(config)))
  grey = contract is not None and contract['colour'] == 'grey'

  def serve(images: jax.Array) -> tuple:
    images = grey_images(images) if grey else images
    x = steps.normalise_images(images, config.data.mean_rgb,
                               config.data.std_rgb)
    out = model.apply(variables, x, train=False)
    return jax.nn.softmax(out['logits']), out['logits'], out['va']
  return serve


def image_spec(image_size: int) -> jax.ShapeDtypeStruct:
  """uint8 [B, S, S, 3] with a symbolic batch dimension B."""
  batch, = jax.export.symbolic_shape('B')
  return jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8)


def stablehlo_bytes(fn: Callable, image_size: int) -> bytes:
  """fn as a serialized jax.export artifact (jax.export.deserialize)."""
  exported = jax.export.export(jax.jit(fn), platforms=PLATFORMS)(
      image_spec(image_size))
  return bytes(exported.serialize())


def _padded(x: jax.Array, value: jax.Array, padding_config) -> jax.Array:
  """lax.pad without interior padding, as slices and concatenations with
  blocks of value (jax2onnx's pad fails on a symbolic batch dimension)."""
  for axis, (low, high, interior) in enumerate(padding_config):
    if interior:
      raise NotImplementedError('ONNX export: lax.pad with interior padding')
    if low < 0 or high < 0:
      x = lax.slice_in_dim(x, max(-low, 0), x.shape[axis] - max(-high, 0),
                           axis=axis)
    block = lambda n, axis=axis, x=x: lax.broadcast_in_dim(
        lax.convert_element_type(value, x.dtype),
        (*x.shape[:axis], n, *x.shape[axis + 1:]), ())
    parts = ([block(low)] if low > 0 else []) + [x] + (
        [block(high)] if high > 0 else [])
    x = lax.concatenate(parts, axis) if len(parts) > 1 else x
  return x


def _window_max(x: jax.Array, window_dimensions, window_strides, padding,
                base_dilation, window_dilation) -> jax.Array:
  """reduce_window_max as the maximum of the window's strided views, the
  same numbers (jax2onnx makes a MaxPool over NHWC that onnxruntime
  rejects)."""
  if any(d != 1 for d in (*base_dilation, *window_dilation)):
    raise NotImplementedError('ONNX export: dilated reduce_window_max')
  lowest = (-jnp.inf if jnp.issubdtype(x.dtype, jnp.floating)
            else jnp.iinfo(x.dtype).min)
  x = _padded(x, jnp.asarray(lowest, x.dtype),
              [(low, high, 0) for low, high in padding])
  result = None
  for offsets in itertools.product(*map(range, window_dimensions)):
    view = x
    for axis, (start, k, s) in enumerate(zip(offsets, window_dimensions,
                                             window_strides)):
      if k > 1 or s > 1:
        count = (x.shape[axis] - k) // s + 1
        view = lax.slice_in_dim(view, start, start + (count - 1) * s + 1, s,
                                axis)
    result = view if result is None else lax.max(result, view)
  return result


_REWRITES = {'pad': _padded, 'reduce_window_max': _window_max}


def _evaluate(jaxpr: core.Jaxpr, consts: list, args: list) -> list:
  """jaxpr's outputs, with call primitives inlined and the primitives of
  _REWRITES replaced by their equivalents."""
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  read = lambda v: v.val if isinstance(v, core.Literal) else env[v]
  for eqn in jaxpr.eqns:
    inputs, name = [read(v) for v in eqn.invars], eqn.primitive.name
    if name in _INLINED:
      called = eqn.params[_INLINED[name]]
      outputs = _evaluate(called.jaxpr, called.consts, inputs)
    elif name in _REWRITES:
      outputs = [_REWRITES[name](*inputs, **eqn.params)]
    else:
      outputs = eqn.primitive.bind(
          *inputs, **eqn.primitive.get_bind_params(eqn.params))
      outputs = outputs if eqn.primitive.multiple_results else [outputs]
    env.update(zip(eqn.outvars, outputs))
  return [read(v) for v in jaxpr.outvars]


def _onnx_packages():
  """(jax2onnx, onnx, onnxruntime); UsageError naming the install if any
  is missing."""
  try:
    import jax2onnx  # pylint: disable=import-outside-toplevel
    import onnx  # pylint: disable=import-outside-toplevel
    import onnxruntime  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise UsageError(f'ONNX export needs jax2onnx, onnx and onnxruntime '
                     f'({error}): {INSTALL}') from None
  return jax2onnx, onnx, onnxruntime


@contextlib.contextmanager
def _quiet(name: str):
  """Silences a logger below errors (jax2onnx logs a traceback for each of
  its plugins whose optional package is not installed)."""
  logger = py_logging.getLogger(name)
  level = logger.level
  logger.setLevel(py_logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def onnx_bytes(fn: Callable, image_size: int) -> bytes:
  """fn as a serialized ONNX model (input 'images', outputs OUTPUT_NAMES).

  fn is traced to a jaxpr here, so jax2onnx converts lax primitives, not
  the Flax modules it patches while tracing; _evaluate replaces those it
  converts wrongly.
  """
  jax2onnx, _, _ = _onnx_packages()
  spec = image_spec(image_size)
  closed = jax.make_jaxpr(fn)(spec)
  portable = lambda images: tuple(_evaluate(closed.jaxpr, closed.consts,
                                            [images]))
  with _quiet('jax2onnx'):
    model = jax2onnx.to_onnx(portable, [spec], model_name='fer_jax',
                             opset=ONNX_OPSET, input_names=[INPUT_NAME],
                             output_names=list(OUTPUT_NAMES))
  model.ir_version = ONNX_IR_VERSION  # the graph needs nothing newer
  return model.SerializeToString()


def check_onnx(model: bytes, reference: Callable, image_size: int) -> float:
  """The largest difference between onnxruntime's outputs and reference's
  on random images, as one batch and as batches of 1 (one batch size
  compiled); RuntimeError past TOLERANCE."""
  _, onnx, onnxruntime = _onnx_packages()
  onnx.checker.check_model(onnx.load_from_string(model))
  session = onnxruntime.InferenceSession(
      model, providers=['CPUExecutionProvider'])
  images = np.random.default_rng(0).integers(
      0, 256, (CHECK_BATCH_SIZE, image_size, image_size, 3), np.uint8)
  expected = [np.asarray(x) for x in reference(images)]
  worst = 0.0
  for rows in (slice(None), *(slice(i, i + 1) for i in range(len(images)))):
    got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images[rows]})
    for name, a, b in zip(OUTPUT_NAMES, got, expected):
      if a.shape != b[rows].shape:
        raise RuntimeError(f'ONNX export: {name} has shape {a.shape}, JAX '
                           f'{b[rows].shape}')
      worst = max(worst, float(np.max(np.abs(a - b[rows]))))
  if worst > TOLERANCE:
    raise RuntimeError(f'ONNX export: onnxruntime differs from JAX by '
                       f'{worst:.2e} (> {TOLERANCE})')
  return worst


def model_info(config: ml_collections.ConfigDict, workdir: Path, step: int,
               meta: dict, written: dict, difference: float | None,
               contract: dict | None = None) -> dict:
  """model.json: the exported graphs' contract and where they came from.

  difference: onnxruntime's largest from JAX in check_onnx, if checked.
  contract: the run's face contract, stated whole (None: a legacy run's).
  """
  contract = contract or face_contract.legacy(config)
  names = run_classes(config)
  size, classes = config.data.image_size, len(names)
  va = 'valence, arousal' + (' in [-1, 1] (tanh)'
                             if config.model.va_activation == 'tanh' else '')
  return {
      'files': written,
      'input': {'name': INPUT_NAME, 'dtype': 'uint8',
                'shape': ['B', size, size, 3], 'layout': 'NHWC, RGB',
                'colour': ('RGB; the graph turns it grey (ITU-R 601 luma) '
                           'as the model was trained'
                           if contract['colour'] == 'grey' else 'RGB')},
      'outputs': [
          {'name': 'probs', 'shape': ['B', classes],
           'is': 'softmax(logits)'},
          {'name': 'logits', 'shape': ['B', classes],
           'is': 'expression logits'},
          {'name': 'va', 'shape': ['B', 2], 'is': va}],
      'classes': list(names),
      'image_size': size,
      'crop': face_contract.describe(contract),
      'face_contract': contract,
      # Informational: the graphs normalise the uint8 input themselves.
      'normalisation': '(x / 255 - mean_rgb) / std_rgb, inside the graph',
      'mean_rgb': list(config.data.mean_rgb),
      'std_rgb': list(config.data.std_rgb),
      'model': config.model.name,
      'compute_dtype': 'float32',
      'trained_dtype': config.model.dtype,
      'ema_weights': config.train.ema_decay > 0,
      'workdir': str(Path(workdir).resolve()),
      'step': step,
      'training_rules': steps.rules_of(meta),
      'jax': jax.__version__,
      'stablehlo_platforms': list(PLATFORMS),
      **({'onnx_opset': ONNX_OPSET,
          'onnx_check': {'images': CHECK_BATCH_SIZE,
                         'max_abs_difference': difference}}
         if difference is not None else {}),
  }


def _publish(staging: Path, folder: Path) -> None:
  """Renames the complete staging folder to folder; UsageError if taken."""
  try:
    os.rename(staging, folder)
  except OSError as error:  # another export finished meanwhile
    raise UsageError(f'{folder}: exists ({error.strerror}); an export is '
                     'never overwritten') from None


def export(config: ml_collections.ConfigDict, workdir: str | Path,
           checkpoint_step: int | None = None) -> Path:
  """Writes the export of a checkpoint (None: the best); returns its folder.

  The files are written to a hidden folder beside it, which becomes
  report/export/model-step<N> once complete. Without the ONNX packages,
  the StableHLO artifact is still exported, then UsageError says what
  to install.
  """
  workdir = Path(workdir)
  config = inference.deploy_config(config, workdir)
  config_rules.check(config, None, training=False, reads_data=False)
  step = inference.find_step(config, workdir, checkpoint_step)
  folder = workdir / 'report' / 'export' / f'model-step{step}'
  if folder.exists():
    raise UsageError(f'{folder}: exists; an export is never overwritten '
                     '(remove it to export again)')
  state, step, meta = inference.restore_state(config, workdir, step)
  if config.eval.tta != 'none':
    logging.warning('eval.tta=%s is not exported: the graphs read each '
                    'image once', config.eval.tta)
  contract = face_contract.read(workdir, config)
  fn = serving_fn(config, jax.device_get(steps.eval_variables(state)),
                  contract)
  size = config.data.image_size
  staging = folder.with_name(f'.{folder.name}.{secrets.token_hex(4)}.tmp')
  staging.mkdir(parents=True)
  try:
    serialized = stablehlo_bytes(fn, size)
    files.write_bytes(staging / STABLEHLO_FILE, serialized)
    written = {'stablehlo': STABLEHLO_FILE}
    try:
      model = onnx_bytes(fn, size)
    except UsageError as error:
      missing, difference = error, None
    else:
      missing = None
      exported = jax.export.deserialize(bytearray(serialized))
      difference = check_onnx(model, exported.call, size)
      files.write_bytes(staging / ONNX_FILE, model)
      written['onnx'] = ONNX_FILE
    files.write_json(staging / INFO_FILE, model_info(
        config, workdir, step, meta, written, difference, contract))
    _publish(staging, folder)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  print(f'Exported step {step} of {workdir} to {folder}: '
        f"{', '.join(written.values())}, {INFO_FILE}" +
        (f' (onnxruntime within {difference:.1e} of JAX)' if missing is None
         else ''))
  if missing:
    raise UsageError(f'{folder}: {STABLEHLO_FILE} only; {missing}, then '
                     'remove the folder and export again')
  return folder
