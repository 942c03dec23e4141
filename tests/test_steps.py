"""The pmapped train step: it learns, and sharding does not change it."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fer_jax import losses, models, steps
from tests.conftest import NUM_DEVICES, ROOT


def fixed_batch(n, size, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
          'label': rng.integers(0, 8, n).astype(np.int32),
          'va': rng.uniform(-1, 1, (n, 2)).astype(np.float32),
          'va_mask': rng.random(n) > 0.25, 'mask': np.ones(n, bool)}


def shard(batch, devices):
  return {k: v.reshape(devices, -1, *v.shape[1:]) for k, v in batch.items()}


def run_steps(config, batch, devices, num_steps, rate=1e-4):
  """num_steps SGD steps (momentum 0.9) on one batch over `devices`
  devices: (the losses, the state after the first step), the state on the
  host."""
  model = models.create_model(config.model, axis_name=steps.AXIS)
  config.train.optimizer = 'sgd'
  tx = steps.create_optimizer(config.train, lambda step: rate)
  state = steps.create_train_state(model, tx, config.data.image_size, 0)
  weights = losses.class_weights('inverse_frequency', np.arange(1, 9))
  p_train, _ = steps.pmap_steps(model, tx, config, weights,
                                devices=jax.local_devices()[:devices])
  state = steps.replicate(state, jax.local_devices()[:devices])
  history, first = [], None
  for _ in range(num_steps):
    state, metrics = p_train(state, shard(batch, devices))
    history.append(float(metrics['loss'][0]))
    if first is None:  # copied: the next step donates the state's buffers
      first = jax.tree.map(np.array, steps.unreplicate(state))
  return history, first


def first_step_differences(one, many) -> dict:
  """How far a sharded run's first step is from one device's, from the same
  start on the same global batch, relative to one device's: the loss, the
  gradient (SGD's momentum after one step: the gradient plus weight decay)
  and the BatchNorm statistics, each tree as one float64 vector.

  Only the first step is compared. From the same parameters the only
  difference is the order in which float32 sums are rounded (within each
  device, then psum), of order 1e-7 relative. Later steps are not
  comparable: on a fixed batch of 8-16 images the dynamics are chaotic,
  and by step 3 those 1e-7 have grown to 1e-4 on some CPUs (AVX-512) and
  not on others (AVX2). The gradient is read from the optimiser's state,
  not from the parameters: at a rate of 1e-4 an update is a few ulps of
  the parameter it is added to.
  """
  (losses_one, first_one), (losses_many, first_many) = one, many
  flat = lambda tree: np.concatenate(
      [np.ravel(x) for x in jax.tree.leaves(tree)
       if np.issubdtype(x.dtype, np.floating)]).astype(np.float64)
  rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
  return {'loss': abs(losses_many[0] - losses_one[0]) / losses_one[0],
          'gradient': rel(flat(first_many.opt_state),
                          flat(first_one.opt_state)),
          'batch_stats': rel(flat(first_many.batch_stats),
                             flat(first_one.batch_stats))}


def assert_agree_to_rounding(differences: dict) -> None:
  """Measured on 4 devices against 1 with CCC: loss 4e-7, gradient 4e-6
  (11 million of them, through the whole backward pass), BatchNorm
  statistics 6e-8. The bounds leave a margin of 25 or more; the faults
  they catch are far larger: BatchNorm statistics per device instead of
  across devices move all three by 8e-3 or more, a gradient averaged over
  the devices instead of summed moves it by 0.75."""
  assert set(differences) == {'loss', 'gradient', 'batch_stats'}
  assert differences['loss'] < 1e-5, differences
  assert differences['gradient'] < 1e-4, differences
  assert differences['batch_stats'] < 2e-6, differences


def test_the_train_step_is_traced_once(data_cache, monkeypatch):
  from tests.conftest import tiny_config
  traces = []
  original = steps.train_step

  def counting_train_step(*args, **kwargs):
    traces.append(1)
    return original(*args, **kwargs)

  monkeypatch.setattr(steps, 'train_step', counting_train_step)
  config = tiny_config(data_cache)
  model = models.create_model(config.model, axis_name=steps.AXIS)
  tx = steps.create_optimizer(config.train, lambda step: 1e-3)
  p_train, _ = steps.pmap_steps(model, tx, config)
  state = steps.replicate(steps.create_train_state(
      model, tx, config.data.image_size, 0))
  batch = shard(fixed_batch(8, config.data.image_size), NUM_DEVICES)
  for _ in range(3):
    state, _ = p_train(state, batch)
  assert len(traces) == 1


@pytest.fixture(scope='module', params=['mse', 'mse+ccc'])
def runs(request, data_cache):
  """CCC too: non-linear in the batch's sums, it needs the whole batch."""
  from tests.conftest import tiny_config
  config = tiny_config(data_cache)
  config.train.va_loss = request.param
  # 16 images: with 8 (4 a device) the gradients of 1 and 2 devices
  # differed by 2e-2 under -O0 machine code, loss and statistics by 1e-7:
  # a tie in the backward pass that the rounding tips, not an error.
  batch = fixed_batch(16, config.data.image_size)
  # The rate moves neither the first step's loss, gradient (read from the
  # momentum) nor statistics; 3e-2 lets the tiny CNN learn in 4 steps.
  return {d: run_steps(config, batch, d, 4 if d == 1 else 1, rate=3e-2)
          for d in (1, NUM_DEVICES)}


def test_train_steps_lower_the_loss_on_a_fixed_batch(runs):
  history, _ = runs[1]
  assert history[-1] < 0.7 * history[0]


def test_one_and_two_devices_agree_on_the_same_global_batch(runs):
  """Cross-replica BatchNorm statistics and summed gradients make the
  sharded step equal to the single-device one, to float32 rounding."""
  assert_agree_to_rounding(first_step_differences(runs[1],
                                                  runs[NUM_DEVICES]))


def test_weight_decay_skips_biases_and_batchnorm(data_cache):
  from tests.conftest import tiny_config
  config = tiny_config(data_cache).train
  config.weight_decay = 0.5
  tx = steps.create_optimizer(config, lambda step: 1.0)
  params = {'kernel': np.ones((2, 2), np.float32),
            'bias': np.ones(2, np.float32)}
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert np.all(np.asarray(updates['bias']) == 0)
  assert np.all(np.asarray(updates['kernel']) < 0)


def test_schedule_warms_up_then_decays_to_zero(data_cache):
  from tests.conftest import tiny_config
  config = tiny_config(data_cache).train
  config.num_epochs, config.warmup_epochs, config.learning_rate = 4, 1, 0.1
  schedule = steps.learning_rate_fn(config, steps_per_epoch=10)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(0.1)
  assert float(schedule(5)) == pytest.approx(0.05)
  assert float(schedule(40)) == pytest.approx(0.0, abs=1e-7)
  assert float(schedule(25)) == pytest.approx(0.05, rel=1e-4)


def test_schedule_of_a_single_step_run(data_cache):
  from tests.conftest import tiny_config
  config = tiny_config(data_cache).train
  config.num_epochs, config.learning_rate = 1, 0.1
  for kind in ('cosine', 'constant'):
    config.schedule = kind
    schedule = steps.learning_rate_fn(config, steps_per_epoch=1)
    assert float(schedule(1)) == pytest.approx(0.1)


def test_step_schedule_decays_at_the_given_epochs(data_cache):
  from tests.conftest import tiny_config
  config = tiny_config(data_cache).train
  config.update(dict(num_epochs=4, warmup_epochs=1, learning_rate=0.1,
                     schedule='step', step_decay_epochs=(2, 3),
                     step_decay_factor=0.1))
  schedule = steps.learning_rate_fn(config, steps_per_epoch=10)
  got = [float(schedule(s)) for s in (5, 10, 19, 20, 29, 30, 39)]
  np.testing.assert_allclose(got, [0.05, 0.1, 0.1, 0.01, 0.01, 0.001,
                                   0.001], rtol=1e-5)
  config.step_decay_epochs = (0.5,)
  with pytest.raises(ValueError, match='must come after the warm-up'):
    steps.learning_rate_fn(config, steps_per_epoch=10)


def test_gradient_clipping_bounds_the_global_norm(data_cache):
  from tests.conftest import tiny_config
  config = tiny_config(data_cache).train
  config.update(dict(optimizer='sgd', weight_decay=0.0, momentum=0.9))
  params = {'w': np.ones((3, 4), np.float32), 'b': np.ones(4, np.float32)}
  grads = {'w': np.full((3, 4), 5.0, np.float32),
           'b': np.full(4, 5.0, np.float32)}  # global norm 20
  norms = {}
  for clip in (0.0, 2.0):
    config.grad_clip_norm = clip
    tx = steps.create_optimizer(config, lambda step: 1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    norms[clip] = float(optax.tree.norm(updates))
  # The first Nesterov step moves by (1 + momentum) x the gradient.
  assert norms[0.0] == pytest.approx(1.9 * 20, rel=1e-5)
  assert norms[2.0] == pytest.approx(1.9 * 2, rel=1e-5)


def test_class_weights_balance_the_classes():
  counts = np.array([260, 470, 90, 50, 20, 13, 90, 13])
  w = losses.class_weights('inverse_frequency', counts)
  np.testing.assert_allclose(w * counts, counts.sum() / 8, rtol=1e-5)
  assert losses.class_weights('none', counts) is None
  with pytest.raises(ValueError, match='train.class_weights'):
    losses.class_weights('sqrt', counts)


def test_init_from_starts_training_from_the_checkpoint(data_cache, tmp_path):
  import torch
  import torchvision
  from tests.conftest import tiny_config
  from fer_jax.models import pretrained
  config = tiny_config(data_cache)
  config.model.name = 'resnet18'
  torch.manual_seed(1)
  path = tmp_path / 'resnet18.pth'
  torch.save(torchvision.models.resnet18().state_dict(), path)
  model = models.create_model(config.model)
  tx = steps.create_optimizer(config.train, lambda step: 1e-3)
  state = steps.create_train_state(model, tx, 32, 0, init_from=str(path))
  scratch = steps.create_train_state(model, tx, 32, 0)
  want = pretrained.load_pretrained(
      {'params': scratch.params, 'batch_stats': scratch.batch_stats}, path)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want['params'])):
    np.testing.assert_array_equal(a, b)
  kernel = state.params['backbone']['conv1']['kernel']
  np.testing.assert_allclose(  # OIHW -> HWIO
      kernel, torch.load(path)['conv1.weight'].numpy().transpose(2, 3, 1, 0))


def test_ema_warms_up_averages_batchnorm_and_is_what_evaluation_uses(
    data_cache):
  """Against the float64 recurrence e <- d_t e + (1 - d_t) x, d_t =
  min(0.8, (1 + t) / (10 + t)), for the parameters and BatchNorm statistics."""
  from tests.conftest import tiny_config
  config = tiny_config(data_cache)
  config.train.ema_decay = 0.8
  model = models.create_model(config.model, axis_name=steps.AXIS)
  tx = steps.create_optimizer(config.train, lambda step: 1e-3)
  p_train, p_eval = steps.pmap_steps(model, tx, config)
  state = steps.replicate(steps.create_train_state(
      model, tx, config.data.image_size, 0, ema=True))
  batch = shard(fixed_batch(8, config.data.image_size), NUM_DEVICES)
  start = steps.unreplicate(state)
  want = jax.tree.map(np.float64, (start.params, start.batch_stats))
  for t in range(3):
    state, _ = p_train(state, batch)
    live = steps.unreplicate(state)
    d = min(0.8, (1 + t) / (10 + t))  # 0.1, 0.18, 0.25: warming up
    want = jax.tree.map(lambda e, x: d * e + (1 - d) * x, want,
                        (live.params, live.batch_stats))
  got = (live.ema_params, live.ema_batch_stats)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  # Without the warm-up the average would still hold 0.8^3 = 51% of the
  # initialisation (0.1 x 0.18 x 0.25 = 0.5% with it), and have moved about
  # 0.35 as far as the parameters (0.9 with it).
  moved = lambda tree: max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(tree), jax.tree.leaves(start.params)))
  assert moved(live.ema_params) > 0.8 * moved(live.params)
  with_ema = jax.device_get(p_eval(state, batch))['probs']
  swapped = state.replace(params=state.ema_params,
                          batch_stats=state.ema_batch_stats,
                          ema_params=None, ema_batch_stats=None)
  np.testing.assert_allclose(
      with_ema, jax.device_get(p_eval(swapped, batch))['probs'], rtol=1e-6)
  live_stats = state.replace(params=state.ema_params, ema_params=None,
                             ema_batch_stats=None)
  assert not np.allclose(
      with_ema, jax.device_get(p_eval(live_stats, batch))['probs'],
      rtol=1e-4)


def toy_tree(rng):
  """A parameter (or gradient) tree with a backbone and a head."""
  draw = lambda *shape: rng.normal(size=shape).astype(np.float32)
  return {'backbone': {'conv': {'kernel': draw(3, 3)},
                       'bn': {'scale': draw(3)}},
          'head': {'dense': {'kernel': draw(3, 2), 'bias': draw(2)}}}


def fresh_first_update(grads, params, lr, weight_decay):
  """AdamW's first update in float64: m / sqrt(v) = g / |g| after bias
  correction, and decay on kernels only."""
  return jax.tree.map(
      lambda g, p: -lr * (np.float64(g) / (np.abs(np.float64(g)) + 1e-8) +
                          weight_decay * p * (p.ndim > 1)), grads, params)


@pytest.mark.parametrize('clip', [0.0, 1.0])
def test_thawed_backbone_takes_a_fresh_optimisers_first_step(data_cache,
                                                             clip):
  """Frozen for 3 steps (one epoch): its updates are zero, its optimiser
  state stays as initialised, and its first update equals a fresh AdamW's
  at the schedule's rate of step 3. The head trains as without a freeze."""
  from tests.conftest import tiny_config
  config = tiny_config(data_cache).train
  config.update(weight_decay=0.1, freeze_backbone_epochs=1.0,
                grad_clip_norm=clip)
  schedule = lambda count: 0.01 * (count + 1.0)
  tx = steps.create_optimizer(config, schedule, steps_per_epoch=3)
  config.freeze_backbone_epochs = 0.0
  head_only = steps.create_optimizer(config, schedule)
  rng = np.random.default_rng(0)
  params = toy_tree(rng)
  opt_state = tx.init(params)
  head_state = head_only.init(params['head'])
  for step in range(4):
    grads = toy_tree(rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    want_head, head_state = head_only.update(grads['head'], head_state,
                                             params['head'])
    # While frozen the clip norm is the head's alone; after, the tree's.
    if step < 3 or not clip:
      for a, b in zip(jax.tree.leaves(updates['head']),
                      jax.tree.leaves(want_head)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    if step < 3:
      assert all(np.all(np.asarray(u) == 0)
                 for u in jax.tree.leaves(updates['backbone']))
  if clip:  # the thaw's gradient, clipped by the whole tree's norm
    scale = min(1.0, clip / float(optax.tree.norm(grads)))
    grads = jax.tree.map(lambda g: g * scale, grads)
  want = fresh_first_update(grads['backbone'], params['backbone'],
                            schedule(3), 0.1)
  for a, b in zip(jax.tree.leaves(updates['backbone']),
                  jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_frozen_backbone_stays_put_while_the_head_learns(data_cache):
  from tests.conftest import tiny_config
  config = tiny_config(data_cache)
  config.train.freeze_backbone_epochs = 2.0
  model = models.create_model(config.model, axis_name=steps.AXIS)
  tx = steps.create_optimizer(config.train, lambda step: 1e-2,
                              steps_per_epoch=1)
  p_train, _ = steps.pmap_steps(model, tx, config)
  state = steps.replicate(steps.create_train_state(
      model, tx, config.data.image_size, 0))
  batch = shard(fixed_batch(8, config.data.image_size), NUM_DEVICES)
  start = steps.unreplicate(state)
  moved = []
  for _ in range(3):
    state, _ = p_train(state, batch)
    now = steps.unreplicate(state)
    moved.append({part: max(float(np.abs(a - b).max()) for a, b in zip(
        jax.tree.leaves(now.params[part]),
        jax.tree.leaves(start.params[part])))
                  for part in ('backbone', 'head')})
  assert moved[0]['backbone'] == moved[1]['backbone'] == 0.0
  assert 0 < moved[0]['head'] < moved[1]['head']
  assert moved[2]['backbone'] > 0  # thawed at step 3
  # Its BatchNorm statistics adapt to the data all along.
  assert not np.allclose(jax.tree.leaves(now.batch_stats)[0],
                         jax.tree.leaves(start.batch_stats)[0])


def test_one_and_four_devices_agree_to_float32_rounding(data_cache):
  """Four simulated devices need their own process (XLA_FLAGS is read
  once). With CCC, the loss that needs the whole batch."""
  result = subprocess.run(
      [sys.executable, '-m', 'tests.four_devices', str(data_cache),
       'mse+ccc'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert_agree_to_rounding(json.loads(result.stdout.strip().splitlines()[-1]))


def test_sam_steps_with_the_gradient_at_the_perturbed_parameters(data_cache):
  """Checked with plain SGD steps (lr 1, no momentum) as the reference."""
  from tests.conftest import tiny_config
  config = tiny_config(data_cache)
  config.train.update(dict(optimizer='sgd', momentum=0.0, weight_decay=0.0))
  model = models.create_model(config.model, axis_name=steps.AXIS)
  tx = steps.create_optimizer(config.train, lambda step: 1.0)
  batch = shard(fixed_batch(8, config.data.image_size), NUM_DEVICES)
  start = steps.create_train_state(model, tx, config.data.image_size, 0)

  def step(rho, state):
    config.train.sam_rho = rho
    p_train, _ = steps.pmap_steps(model, tx, config.copy_and_resolve_references())
    return steps.unreplicate(p_train(steps.replicate(state), batch)[0])

  gradient = lambda before, after: jax.tree.map(
      lambda a, b: np.float64(a) - b, before.params, after.params)
  plain = gradient(start, step(0.0, start))
  norm = np.sqrt(sum(np.sum(g ** 2) for g in jax.tree.leaves(plain)))
  perturbed = start.replace(params=jax.tree.map(
      lambda p, g: np.float32(p + 0.05 * g / norm), start.params, plain))
  want = gradient(perturbed, step(0.0, perturbed))
  got = gradient(start, step(0.05, start))
  flat = lambda tree: np.concatenate([x.ravel() for x in jax.tree.leaves(tree)])
  got, want, plain = flat(got), flat(want), flat(plain)
  # 11 million float32 gradients, each through its own rounding: compared
  # as vectors. The perturbation moves the gradient by 5e3 times more than
  # SAM's and the reference's differ.
  assert np.linalg.norm(got - want) < 1e-5 * np.linalg.norm(want)
  assert np.linalg.norm(got - plain) > 5e3 * np.linalg.norm(got - want)


class TinyBackbone(nn.Module):
  """A strided convolution and BatchNorm: [B, 32, 32, 3] -> [B, 4]."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (4, 4), (4, 4))(x)
    x = nn.BatchNorm(use_running_average=not train,
                     axis_name=steps.AXIS if train else None)(x)
    return jnp.mean(jnp.tanh(x), axis=(1, 2))


class TinyModel(nn.Module):
  """create_model's interface and parameter tree in 250 parameters."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(10, name='head')(TinyBackbone(name='backbone')(x, train))
    return {'logits': x[:, :8], 'va': jnp.tanh(x[:, 8:])}


def test_sam_perturbs_only_the_head_while_the_backbone_is_frozen(
    data_cache):
  """Frozen for the first step: the backbone's perturbation is zero and
  the head's rho g_head / |g_head|; after the thaw, rho g / |g| over the
  whole tree. With SGD at rate 1 an update is minus the gradient at the
  perturbed parameters, which a plain step from them gives. Measured: SAM's
  and the reference's within 5e-8 (frozen) and 4e-7 (thawed) relative; the
  other choice of parameters moves the gradient by 2e-2 and 4e-2."""
  from tests.conftest import tiny_config
  config = tiny_config(data_cache)
  config.train.update(dict(optimizer='sgd', momentum=0.0, weight_decay=0.0))
  model, rate = TinyModel(), lambda step: 1.0
  batch = shard(fixed_batch(8, config.data.image_size), NUM_DEVICES)
  plain_tx = steps.create_optimizer(config.train, rate)
  p_plain, _ = steps.pmap_steps(model, plain_tx,
                                config.copy_and_resolve_references())
  plain = steps.create_train_state(model, plain_tx, 32, 0)
  config.train.update(dict(sam_rho=0.05, freeze_backbone_epochs=1.0))
  tx = steps.create_optimizer(config.train, rate, steps_per_epoch=1)
  p_sam, _ = steps.pmap_steps(model, tx, config)
  state = steps.create_train_state(model, tx, 32, 0)

  def step(p_train, state):
    after = steps.unreplicate(p_train(steps.replicate(state), batch)[0])
    return after, jax.tree.map(lambda a, b: np.float64(a) - b,
                               state.params, after.params)

  def gradient_after_ascent(params, parts):
    """The gradient at params + rho g / |g|, g over `parts` alone."""
    g = step(p_plain, plain.replace(params=params))[1]
    norm = np.sqrt(sum(np.sum(x ** 2) for part in parts
                       for x in jax.tree.leaves(g[part])))
    ascent = {part: jax.tree.map(
        lambda x, part=part: 0.05 * x / norm * (part in parts), tree)
              for part, tree in g.items()}
    return step(p_plain, plain.replace(params=jax.tree.map(
        lambda p, e: np.float32(p + e), params, ascent)))[1]

  flat = lambda tree: np.concatenate([x.ravel() for x in jax.tree.leaves(
      tree)])
  for learning, other in ((('head',), ('backbone', 'head')),
                          (('backbone', 'head'), ('head',))):
    params = state.params
    state, got = step(p_sam, state)
    want = gradient_after_ascent(params, learning)
    wrong = gradient_after_ascent(params, other)
    if learning == ('head',):
      assert not np.any(flat(got['backbone']))  # frozen: no update
      got, want, wrong = got['head'], want['head'], wrong['head']
    got, want, wrong = flat(got), flat(want), flat(wrong)
    assert np.linalg.norm(got - want) < 1e-5 * np.linalg.norm(want)
    assert np.linalg.norm(got - wrong) > 100 * np.linalg.norm(got - want)
