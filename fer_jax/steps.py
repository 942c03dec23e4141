"""The train state, optimiser and the pmapped train and eval steps."""

import functools
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fer_jax import losses, models
from fer_jax.models import pretrained

AXIS = 'batch'  # the pmap axis: BatchNorm statistics and gradients span it
# What the train step makes of a config, numbered; a run resumes only under
# the rules it started with. 2: a frozen backbone's optimiser state kept
# as initialised, class weights of mean 1 per example, EMA with a warm-up
# and averaged BatchNorm statistics, the head in float32 under bfloat16.
# 3: while the backbone is frozen, SAM perturbs the head alone. (FERPlus's
# label modes have their own number, fer2013.FERPLUS_RULES, checked by
# workdir.decide for the runs they concern.)
TRAINING_RULES = 3


def rules_of(record: dict) -> int:
  """The training rules a checkpoint's meta or a test report records; 1
  for those written before the rules were numbered."""
  return record.get('training_rules', 1)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  # train.ema_decay > 0: the moving averages that evaluation uses.
  ema_params: Any = None
  ema_batch_stats: Any = None


def learning_rate_fn(config: ml_collections.ConfigDict,
                     steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up to train.learning_rate, then cosine, step or constant.

  'step': the rate is multiplied by train.step_decay_factor at each epoch
  in train.step_decay_epochs (counted from the start of training).
  """
  peak = config.learning_rate
  warmup = max(1, int(config.warmup_epochs * steps_per_epoch))
  total = max(warmup + 1, config.num_epochs * steps_per_epoch)
  if config.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total,
                                              end_value=0.0)
  if config.schedule == 'constant':
    after = optax.constant_schedule(peak)
  elif config.schedule == 'step':
    boundaries = {int(e * steps_per_epoch) - warmup: config.step_decay_factor
                  for e in config.step_decay_epochs}
    if min(boundaries, default=1) <= 0:
      raise ValueError(f'train.step_decay_epochs: {config.step_decay_epochs}'
                       f' must come after the warm-up '
                       f'({config.warmup_epochs} epochs)')
    after = optax.piecewise_constant_schedule(peak, boundaries)
  else:
    raise ValueError(f"train.schedule: {config.schedule!r} is not 'cosine', "
                     "'step' or 'constant'")
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                               after], [warmup])


def _optimizer(config: ml_collections.ConfigDict,
               schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW or SGD with weight decay on kernels only (not biases or BatchNorm)."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  if config.optimizer == 'adamw':
    return optax.adamw(schedule, weight_decay=config.weight_decay,
                       mask=decay_mask)
  if config.optimizer == 'sgd':
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
        optax.sgd(schedule, momentum=config.momentum, nesterov=True))
  raise ValueError(f"train.optimizer: {config.optimizer!r} is not 'adamw' "
                   "or 'sgd'")


class Optimizer(NamedTuple):
  """An optax transformation, and for how many steps it keeps the backbone
  frozen (0: never)."""
  init: Callable[[Any], Any]
  update: Callable[..., tuple[Any, Any]]
  frozen_steps: int = 0


def create_optimizer(config: ml_collections.ConfigDict,
                     schedule: optax.Schedule,
                     steps_per_epoch: int = 1) -> Optimizer:
  """AdamW or SGD; weight decay skips biases and BatchNorm (1-D) parameters.

  train.grad_clip_norm > 0 first clips the gradients' global norm.
  train.freeze_backbone_epochs > 0: for that many epochs (of
  steps_per_epoch steps) the backbone's updates are zero and its optimiser
  state (moments, step count) stays as initialised, so at the thaw it
  takes a fresh optimiser's first step, at the schedule's rate of that
  step; while frozen, its gradients do not count in the clip norm (nor in
  SAM's perturbation, train_step).
  """
  clip = config.get('grad_clip_norm', 0.0)
  if not config.get('freeze_backbone_epochs', 0.0):
    tx = _optimizer(config, schedule)
    tx = optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx
    return Optimizer(tx.init, tx.update)
  frozen_steps = int(config.freeze_backbone_epochs * steps_per_epoch)
  # The backbone's own counter counts from the thaw; its rate follows the
  # run's step.
  thawed = lambda count: count >= frozen_steps
  backbone = optax.transforms.conditionally_mask(
      _optimizer(config, lambda count: schedule(count + frozen_steps)),
      thawed)
  tx = optax.multi_transform(
      {'backbone': backbone, 'head': _optimizer(config, schedule)},
      models.param_labels)
  if clip:
    silenced = optax.multi_transform(
        {'backbone': optax.transforms.conditionally_mask(optax.identity(),
                                                         thawed),
         'head': optax.identity()}, models.param_labels)
    tx = optax.chain(silenced, optax.clip_by_global_norm(clip), tx)
  return Optimizer(tx.init, tx.update, frozen_steps)


def learning_gradients(grads: Any, step: jax.Array, frozen_steps: int) -> Any:
  """grads with the backbone's zeroed while it is frozen (step <
  frozen_steps): those of the parameters that learn at this step."""
  if not frozen_steps:
    return grads
  frozen = step < frozen_steps
  return {**grads, 'backbone': jax.tree.map(
      lambda g: jnp.where(frozen, jnp.zeros_like(g), g), grads['backbone'])}


def create_train_state(model: nn.Module, tx: Optimizer,
                       image_size: int, seed: int, init_from: str = '',
                       ema: bool = False) -> TrainState:
  """Initial parameters, BatchNorm statistics and optimiser state (one copy).

  init_from: a torchvision checkpoint whose backbone replaces the random one.
  ema: keep exponential moving averages of the parameters and BatchNorm
  statistics (ema_update), starting at them.
  """
  init_rng, rng = jax.random.split(jax.random.PRNGKey(seed))
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(
      init_rng, images)
  if init_from:
    variables = pretrained.load_pretrained(variables, init_from)
  params, batch_stats = variables['params'], variables['batch_stats']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=batch_stats, opt_state=tx.init(params),
                    rng=rng, ema_params=params if ema else None,
                    ema_batch_stats=batch_stats if ema else None)


def ema_decay(decay: float, step: jax.Array) -> jax.Array:
  """The decay of the update after `step` updates: min(decay, (1 + step) /
  (10 + step)). The initialisation keeps a weight of 1e-5 after ten
  updates, where a constant 0.999 would keep 0.1 after 2,300; the window
  then spans about the last ninth of the steps so far, up to 1 / (1 - decay)
  steps."""
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(state: 'TrainState', decay: float) -> 'TrainState':
  """state's averages moved towards its parameters and BatchNorm statistics.

  The statistics are averaged with the same decay, so the averaged model is
  evaluated with statistics of the same window of training (as TensorFlow's
  EfficientNet averages its moving means and variances) instead of those of
  the latest parameters; recomputing them would cost a pass over training
  data at each evaluation.
  """
  d = ema_decay(decay, state.step)
  average = lambda old, new: jax.tree.map(
      lambda o, n: d * o + (1 - d) * n, old, new)
  return state.replace(
      ema_params=average(state.ema_params, state.params),
      ema_batch_stats=average(state.ema_batch_stats, state.batch_stats))


def normalise_images(images: jax.Array, mean_rgb, std_rgb) -> jax.Array:
  """uint8 images to float32 (x / 255 - mean) / std; the model casts."""
  mean = jnp.asarray(mean_rgb, jnp.float32) * 255
  std = jnp.asarray(std_rgb, jnp.float32) * 255
  return (images.astype(jnp.float32) - mean) / std


def train_step(state: TrainState, batch: dict, *, model: nn.Module,
               tx: Optimizer, config: ml_collections.ConfigDict,
               weights: np.ndarray | None) -> tuple[TrainState, dict]:
  """One step on this device's shard; run under pmap with axis AXIS.

  A backbone frozen by the optimiser (create_optimizer) keeps adapting its
  BatchNorm statistics to the data.
  """
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                           jax.lax.axis_index(AXIS))
  images = normalise_images(batch['image'], config.data.mean_rgb,
                            config.data.std_rgb)
  sums_of = functools.partial(losses.loss_sums,
                              label_smoothing=config.train.label_smoothing,
                              weights=weights,
                              multi_target=losses.is_multi_target(config.data))
  total = lambda sums: losses.normalise(
      sums, config.train.va_loss_weight,
      config.train.get('va_loss', 'mse'))['loss']

  def loss_fn(params):
    outputs, updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, images,
        train=True, mutable=['batch_stats'], rngs={'dropout': rng})
    sums = sums_of(outputs, batch)
    # The loss is a function of the whole batch's sums. Each shard's
    # surrogate, sum_k dL/dS_k x s_k with the derivatives taken at the
    # global sums, has this shard's share of the gradient: summed over
    # devices, exactly the whole batch's (also for the non-linear CCC).
    global_sums = jax.lax.psum(jax.lax.stop_gradient(sums), AXIS)
    slopes = jax.grad(total)(global_sums)
    surrogate = sum(jnp.sum(jax.lax.stop_gradient(slopes[k]) * sums[k])
                    for k in sums)
    return surrogate, (global_sums, updates['batch_stats'])

  grads, (global_sums, batch_stats) = jax.grad(loss_fn, has_aux=True)(
      state.params)
  grads = jax.lax.psum(grads, AXIS)
  rho = config.train.get('sam_rho', 0.0)
  if rho:
    # Sharpness-aware minimisation (Foret et al., 2021): the gradient at
    # the steepest point within rho of the parameters that learn (a frozen
    # backbone stays put, as the clip norm leaves it out). Metrics and
    # BatchNorm statistics stay those of the parameters themselves.
    ascent = learning_gradients(grads, state.step, tx.frozen_steps)
    scale = rho / (optax.tree.norm(ascent) + 1e-12)
    perturbed = jax.tree.map(lambda p, g: p + scale * g, state.params, ascent)
    grads = jax.lax.psum(jax.grad(loss_fn, has_aux=True)(perturbed)[0], AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  state = state.replace(params=optax.apply_updates(state.params, updates),
                        batch_stats=batch_stats, opt_state=opt_state)
  if state.ema_params is not None:
    state = ema_update(state, config.train.ema_decay)
  state = state.replace(step=state.step + 1)
  metrics = losses.normalise(global_sums, config.train.va_loss_weight,
                             config.train.get('va_loss', 'mse'))
  return state, metrics


def eval_step(state: TrainState, batch: dict, *, model: nn.Module,
              config: ml_collections.ConfigDict,
              weights: np.ndarray | None) -> dict:
  """Probabilities, the logits they come from, valence/arousal and loss
  sums of one shard. (The logits score a data set with fewer classes than
  the model: inference.shared_probabilities.)

  eval.tta 'flip': the image and its mirror, probabilities and
  valence/arousal averaged (flip_average; the logits are log-probabilities
  then). With train.ema_decay > 0 the averaged parameters and BatchNorm
  statistics are evaluated.
  """
  outputs = eval_outputs(model, eval_variables(state), batch['image'],
                         config)
  sums = jax.lax.psum(losses.loss_sums(
      outputs, batch, config.train.label_smoothing, weights,
      losses.is_multi_target(config.data)), AXIS)
  return {'probs': jax.nn.softmax(outputs['logits']),
          'logits': outputs['logits'], 'va': outputs['va'], 'sums': sums}


def eval_variables(state: TrainState) -> dict:
  """The variables evaluation uses: the EMA ones when the run kept them."""
  if state.ema_params is None:
    return {'params': state.params, 'batch_stats': state.batch_stats}
  return {'params': state.ema_params, 'batch_stats': state.ema_batch_stats}


def eval_outputs(model: nn.Module, variables: dict, images: jax.Array,
                 config: ml_collections.ConfigDict) -> dict:
  """The model's logits and valence/arousal of uint8 images in evaluation
  mode; under eval.tta 'flip' averaged with the mirror's (flip_average:
  the logits are log-probabilities then)."""
  x = normalise_images(images, config.data.mean_rgb, config.data.std_rgb)
  outputs = model.apply(variables, x, train=False)
  tta = config.get('eval', {}).get('tta', 'none')
  if tta == 'flip':
    return flip_average(outputs, model.apply(variables, x[:, :, ::-1],
                                             train=False))
  if tta != 'none':
    raise ValueError(f"eval.tta: {tta!r} is not 'none' or 'flip'")
  return outputs


def flip_average(outputs: dict, mirrored: dict) -> dict:
  """The mean of two views' probabilities, as log-probabilities ('logits'),
  and of their valence/arousal.

  Averaged in log space, log((p + q) / 2) = logaddexp(log p, log q) - log 2,
  so a probability that underflows in both views stays a finite log.
  """
  log_probs = (jnp.logaddexp(jax.nn.log_softmax(outputs['logits']),
                             jax.nn.log_softmax(mirrored['logits'])) -
               jnp.log(2.0))
  return {'logits': log_probs, 'va': (outputs['va'] + mirrored['va']) / 2}


def pmap_steps(model: nn.Module, tx: Optimizer,
               config: ml_collections.ConfigDict,
               weights: np.ndarray | None = None, devices=None):
  """The train step (state donated) and eval step, pmapped over devices.

  weights: per-class cross-entropy weights (losses.class_weights) or None.
  """
  p_train = jax.pmap(
      functools.partial(train_step, model=model, tx=tx, config=config,
                        weights=weights),
      axis_name=AXIS, donate_argnums=(0,), devices=devices)
  p_eval = jax.pmap(functools.partial(eval_step, model=model, config=config,
                                      weights=weights),
                    axis_name=AXIS, devices=devices)
  return p_train, p_eval


def shard(tree: Any, devices=None) -> Any:
  """Arrays [D, ...] placed one slice per device, as the steps' outputs are.

  Placed by a pmap over AXIS, so they carry the same sharding as the train
  step's outputs: with flax.jax_utils.replicate's sharding, the step's
  second call missed pmap's cache and compiled the step again.
  """
  # devices=None: every device of every process, each process giving its
  # local slices, as the steps expect.
  return jax.pmap(lambda x: x, axis_name=AXIS, devices=devices)(tree)


def replicate(tree: Any, devices=None) -> Any:
  """One copy of tree on every local device (or on devices), as pmap expects."""
  count = len(devices or jax.local_devices())
  # One transfer of every leaf to the host, then views, not copies, of
  # each: leaf by leaf with np.stack this took 1.1 s for ResNet18's state.
  host = jax.device_get(tree)
  return shard(jax.tree.map(
      lambda x: np.broadcast_to(np.asarray(x), (count, *np.shape(x))),
      host), devices)


def _local_shards(x: jax.Array) -> list:
  """x's slices on this process's devices, in the order of its device axis.

  With several processes a pmapped output spans every process's devices,
  and each process can read only its own.
  """
  start = lambda shard: (shard.index[0] if isinstance(shard.index[0], int)
                         else shard.index[0].start)  # pmap's index: an int
  return sorted(x.addressable_shards, key=start)


def local_values(tree: Any) -> Any:
  """The slices [local devices, ...] of pmapped outputs, as NumPy."""
  def local(x):
    if not isinstance(x, jax.Array):
      return np.asarray(x)
    return np.stack([np.asarray(s.data).reshape(x.shape[1:])
                     for s in _local_shards(x)])
  return jax.tree.map(local, tree)


def unreplicate(tree: Any) -> Any:
  """The first local device's copy, as NumPy on the host (that one only)."""
  def first(x):
    if not isinstance(x, jax.Array):
      return np.asarray(x[0])
    return np.asarray(_local_shards(x)[0].data).reshape(x.shape[1:])
  return jax.tree.map(first, tree)
