"""The recover engine, function by function, against direct formulas (tiny ConvNet teacher)."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dwa_jax import progress as progress_lib
from dwa_jax import device_dispatch
from dwa_jax import recover, synthesis
from dwa_jax.models import build_model
from dwa_jax.models.convnet import ConvNet

IMAGE = (8, 8, 3)
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
NUM_CLASSES = 4


@pytest.fixture(scope="module")
def teacher():
  """A tiny ConvNet with non-trivial BN running statistics."""
  model = ConvNet(NUM_CLASSES, width=8, depth=2)
  variables = model.init(jax.random.key(0), jnp.zeros((1, *IMAGE)))
  keys = iter(jax.random.split(jax.random.key(1), 8))
  stats = jax.tree.map(lambda v: v + 0.3 * jax.random.uniform(next(keys), v.shape),
                       variables["batch_stats"])
  return model, {"params": variables["params"], "batch_stats": stats}


@pytest.fixture(scope="module")
def batch():
  x = jax.random.normal(jax.random.key(2), (NUM_CLASSES, *IMAGE))
  return x, jnp.arange(NUM_CLASSES)


def paths(teacher):
  model, variables = teacher
  return synthesis.bn_layer_paths(model, variables, IMAGE)


def test_bn_layer_paths_follow_call_order():
  model = build_model("resnet18_cifar", 10)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  order = synthesis.bn_layer_paths(model, variables, (32, 32, 3))
  assert len(order) == 20
  assert order[:4] == (("bn1",), ("layer1_0", "bn1"), ("layer1_0", "bn2"), ("layer1_1", "bn1"))
  assert order[5:8] == (("layer2_0", "bn1"), ("layer2_0", "bn2"), ("layer2_0", "downsample_1"))
  deep = build_model("resnet101_cifar", 10)
  variables = jax.eval_shape(deep.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  order = [p[0] for p in synthesis.bn_layer_paths(deep, variables, (8, 8, 3))]
  # Call order, not the sorted order of pytree keys (layer3_10 comes after layer3_9).
  assert order.index("layer3_10") > order.index("layer3_9")


class NoBatchNorm(nn.Module):

  @nn.compact
  def __call__(self, x, train=False, capture_stats=False):
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_teacher_without_batchnorm_is_rejected():
  model = NoBatchNorm()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
  with pytest.raises(ValueError, match="no BatchNorm layer"):
    synthesis.bn_layer_paths(model, variables, (4, 4, 3))


def test_bn_terms_use_each_bn_layers_input(teacher, batch):
  model, variables = teacher
  x, _ = batch
  bn_paths = paths(teacher)
  _, stats = synthesis.forward_with_bn_stats(model, variables["params"], variables["batch_stats"], x,
                                           bn_paths)
  # The input of the first BN layer is the first conv's output, computed independently.
  p = variables["params"]["features_0"]
  conv_out = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), ((1, 1), (1, 1)),
                                          dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]
  flat = np.asarray(conv_out).reshape(-1, 8)
  np.testing.assert_allclose(stats[0][0], flat.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats[0][1], flat.var(0), rtol=1e-4, atol=1e-6)
  terms = synthesis.bn_matching_terms(stats, variables["batch_stats"], bn_paths, r_var=11.0)
  running = variables["batch_stats"]["features_1"]
  expected0 = (11.0 * np.linalg.norm(flat.var(0) - running["var"])
               + np.linalg.norm(flat.mean(0) - running["mean"]))
  assert terms.shape == (2,)
  np.testing.assert_allclose(terms[0], expected0, rtol=1e-4)


def test_synthesis_loss_is_ce_plus_weighted_bn_terms(teacher, batch):
  model, variables = teacher
  x, labels = batch
  bn_paths = paths(teacher)
  cfg = synthesis.SynthesisConfig(r_bn=0.05, r_var=3.0, first_bn_weight=10.0)
  loss, (ce, terms) = synthesis.synthesis_loss(
      model, variables["params"], variables["batch_stats"], x, labels, bn_paths,
      synthesis.bn_layer_weights(2, 10.0), cfg)
  logits = np.asarray(model.apply(variables, x), np.float64)
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  np.testing.assert_allclose(ce, -log_p[np.arange(4), np.asarray(labels)].mean(), rtol=1e-5)
  np.testing.assert_allclose(loss, ce + 0.05 * (10 * terms[0] + terms[1]), rtol=1e-6)


def _ce_params(model, variables, x, labels):
  return lambda params: synthesis.cross_entropy(
      model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x), labels)


def test_one_ascent_step_is_rho_times_unit_gradient(teacher, batch):
  model, variables = teacher
  x, labels = batch
  cfg = synthesis.SynthesisConfig(adjust_steps=1, rho=0.1)
  delta, ascent_grad, metrics = synthesis.delta_theta(model, variables, x, labels, jnp.array([0, 0]),
                                                    image_shape=IMAGE, cfg=cfg)
  g = jax.grad(_ce_params(model, variables, x, labels))(variables["params"])
  norm = np.sqrt(sum(np.sum(np.square(l)) for l in jax.tree.leaves(g)))
  for d, gi in zip(jax.tree.leaves(delta), jax.tree.leaves(g)):
    np.testing.assert_allclose(d, 0.1 * gi / (norm + 1e-12), rtol=1e-4, atol=1e-8)
  assert not np.any(ascent_grad)  # compat_q1 off: nothing leaks into the image gradient
  assert metrics["ce"].shape == (1,)


def test_k_step_adjustment_moves_every_parameter_and_raises_the_loss(teacher, batch):
  model, variables = teacher
  x, labels = batch
  cfg = synthesis.SynthesisConfig(adjust_steps=6, rho=0.5)
  offset = jnp.array([1, 2])
  delta, _, metrics = synthesis.delta_theta(model, variables, x, labels, offset, image_shape=IMAGE,
                                          cfg=cfg)
  norm = float(optax.tree.norm(delta))
  assert 0.9 * 0.5 < norm <= 0.5 + 1e-6
  # BN affine parameters are perturbed too; running statistics are not parameters at all.
  assert np.all(np.abs(delta["features_1"]["scale"]) > 0)
  assert np.all(np.abs(delta["features_1"]["bias"]) > 0)
  assert np.all(np.diff(metrics["ce"]) > 0)  # gradient ascent on the loss
  # Each step used the same rolled view: redo step 1 by hand.
  view = jnp.roll(x, (1, 2), axis=(1, 2))
  g = jax.grad(_ce_params(model, variables, view, labels))(variables["params"])
  first = jax.tree.map(lambda gi: (0.5 / 6) * gi / (optax.tree.norm(g) + 1e-12), g)
  cfg1 = synthesis.SynthesisConfig(adjust_steps=1, rho=0.5 / 6)
  delta1, _, _ = synthesis.delta_theta(model, variables, x, labels, offset, image_shape=IMAGE, cfg=cfg1)
  for a, b in zip(jax.tree.leaves(delta1), jax.tree.leaves(first)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)


def test_random_adjustment_has_norm_rho(teacher):
  _, variables = teacher
  a = synthesis.random_weight_adjustment(jax.random.key(0), variables["params"], 0.015)
  b = synthesis.random_weight_adjustment(jax.random.key(1), variables["params"], 0.015)
  np.testing.assert_allclose(optax.tree.norm(a), 0.015, rtol=1e-5)
  assert not np.allclose(jax.tree.leaves(a)[0], jax.tree.leaves(b)[0])


def test_cosine_lr_and_jitter_offsets():
  lrs = [float(synthesis.cosine_lr(t, 10, 0.25, jnp.float32)) for t in range(10)]
  np.testing.assert_allclose(lrs, [0.125 * (1 + np.cos(np.pi * t / 10)) for t in range(10)],
                             rtol=1e-6)
  offsets = np.asarray(synthesis.draw_jitter_offsets(jax.random.key(0), 2000, 4))
  assert offsets.shape == (2000, 2)
  assert set(np.unique(offsets)) == {0, 1, 2, 3, 4}  # inclusive, never negative


def test_roll_view_is_circular_shift(batch):
  x, _ = batch
  v = synthesis.synthesis_view(x, jnp.array([3, 1]), "roll")
  np.testing.assert_array_equal(v, np.roll(np.asarray(x), (3, 1), axis=(1, 2)))


def _first_step_by_hand(teacher, x, labels, cfg, offset, extra=0.0, delta=None):
  model, variables = teacher
  bn_paths = paths(teacher)
  params = variables["params"] if delta is None else jax.tree.map(jnp.add, variables["params"],
                                                                   delta)
  loss = lambda x: synthesis.synthesis_loss(
      model, params, variables["batch_stats"], jnp.roll(x, tuple(offset), axis=(1, 2)), labels,
      bn_paths, synthesis.bn_layer_weights(len(bn_paths), cfg.first_bn_weight), cfg)[0]
  g = np.asarray(jax.grad(loss)(x)) + extra
  lo, hi = synthesis.pixel_bounds(MEAN, STD, jnp.float32)
  # Adam's first step: m̂ = g, v̂ = g², so the update is lr·g/(|g| + eps).
  return np.clip(np.asarray(x) - cfg.lr * g / (np.abs(g) + cfg.adam_eps), lo, hi)


def _synthesize(teacher, x, labels, cfg, offsets, key=jax.random.key(0)):
  model, variables = teacher
  runner = device_dispatch.GroupRunner(model, variables, IMAGE, MEAN, STD, cfg)
  return runner.synthesize(x, labels, key, offsets)


def test_sre2l_first_step_matches_adam_formula(teacher, batch):
  x, labels = batch
  cfg = synthesis.sre2l_config(iterations=1, lr=0.1)
  assert cfg.r_var == 1.0
  offsets = jnp.array([[2, 3]])
  images, metrics = _synthesize(teacher, x, labels, cfg, offsets)
  np.testing.assert_allclose(images, _first_step_by_hand(teacher, x, labels, cfg, (2, 3)),
                             rtol=1e-5, atol=1e-5)
  assert float(metrics["delta_norm"]) == 0.0


@pytest.mark.parametrize("compat", [False, True])
def test_dwa_first_step_with_and_without_quirk_q1(teacher, batch, compat):
  x, labels = batch
  cfg = synthesis.SynthesisConfig(iterations=1, lr=0.1, adjust_steps=3, rho=0.2, compat_q1=compat)
  offsets = jnp.array([[1, 4]])
  images, _ = _synthesize(teacher, x, labels, cfg, offsets)
  model, variables = teacher
  delta, ascent_grad, _ = synthesis.delta_theta(model, variables, x, labels, offsets[0],
                                              image_shape=IMAGE, cfg=cfg)
  assert bool(np.any(ascent_grad)) == compat
  expected = _first_step_by_hand(teacher, x, labels, cfg, (1, 4), np.asarray(ascent_grad), delta)
  np.testing.assert_allclose(images, expected, rtol=1e-5, atol=1e-5)


def _loss_by_hand(teacher, params, x, labels, offset, cfg):
  """CE + r_bn·Σ_l w_l·(r_var‖σ²_l − var_l‖ + ‖μ_l − mean_l‖) of the rolled view, written out
  from the teacher's eval-mode forward and its BN inputs."""
  model, variables = teacher
  bn_paths = paths(teacher)
  view = jnp.roll(x, tuple(offset), axis=(1, 2))
  logits, stats = synthesis.forward_with_bn_stats(model, params, variables["batch_stats"], view,
                                                  bn_paths)
  ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
  bn = 0.0
  for k, ((mu, var), path) in enumerate(zip(stats, bn_paths)):
    running = variables["batch_stats"][path[0]]
    weight = cfg.first_bn_weight if k == 0 else 1.0
    bn += weight * (cfg.r_var * jnp.linalg.norm(var - running["var"])
                    + jnp.linalg.norm(mu - running["mean"]))
  return ce + cfg.r_bn * bn, ce


def _adam_by_hand(grad_at, x, cfg, extra=0.0):
  """cfg.iterations steps of Adam (bias-corrected, betas 0.5/0.9) on the pixels, cosine lr,
  clamped after each, in NumPy; `extra` joins the first step's gradient (quirk Q1)."""
  lo, hi = (np.asarray(b) for b in synthesis.pixel_bounds(MEAN, STD, jnp.float32))
  x = np.asarray(x, np.float64)
  m, v = np.zeros_like(x), np.zeros_like(x)
  for t in range(cfg.iterations):
    g = np.asarray(grad_at(t, jnp.asarray(x, jnp.float32)), np.float64) + (extra if t == 0 else 0)
    m = 0.5 * m + 0.5 * g
    v = 0.9 * v + 0.1 * g * g
    m_hat, v_hat = m / (1 - 0.5 ** (t + 1)), v / (1 - 0.9 ** (t + 1))
    lr = 0.5 * (1 + np.cos(np.pi * t / cfg.iterations)) * cfg.lr
    x = np.clip(x - lr * m_hat / (np.sqrt(v_hat) + 1e-8), lo, hi)
  return x


def test_three_sre2l_steps_are_adam_with_betas_half_and_nine_tenths(teacher, batch):
  """Three iterations against Adam written out in NumPy: at step 1 Adam is nearly a sign
  whatever its betas; by step 3 the moments' decay shows (betas 0.9/0.999 fail here)."""
  x, labels = batch
  cfg = synthesis.sre2l_config(iterations=3, lr=0.1)
  assert (cfg.adam_b1, cfg.adam_b2) == (0.5, 0.9)
  offsets = np.array([[2, 3], [0, 1], [4, 2]])
  images, _ = _synthesize(teacher, x, labels, cfg, jnp.asarray(offsets))
  _, variables = teacher
  grad_at = lambda t, x: jax.grad(lambda x: _loss_by_hand(
      teacher, variables["params"], x, labels, offsets[t], cfg)[0])(x)
  np.testing.assert_allclose(images, _adam_by_hand(grad_at, x, cfg), rtol=1e-4, atol=1e-4)
  wrong = dataclasses.replace(cfg, adam_b1=0.9, adam_b2=0.999)
  images_wrong, _ = _synthesize(teacher, x, labels, wrong, jnp.asarray(offsets))
  assert float(np.abs(np.asarray(images_wrong) - _adam_by_hand(grad_at, x, cfg)).max()) > 1e-3


def test_dwa_with_quirk_q1_is_the_ascent_written_out(teacher, batch):
  """K = 3 ascent passes written out: g_θ, g_x of CE at θ + Δθ on the first view,
  Δθ += (ρ/K)·g_θ/(‖g_θ‖ + 1e-12) over every parameter, Σ_k g_x leaked into Adam's first
  step (quirk Q1); then two Adam steps at θ + Δθ."""
  x, labels = batch
  cfg = synthesis.SynthesisConfig(iterations=2, lr=0.1, adjust_steps=3, rho=0.2, compat_q1=True)
  offsets = np.array([[1, 4], [3, 0]])
  images, metrics = _synthesize(teacher, x, labels, cfg, jnp.asarray(offsets))
  _, variables = teacher
  theta = variables["params"]
  delta = jax.tree.map(jnp.zeros_like, theta)
  leaked = 0.0
  ce_of = lambda d, x: _loss_by_hand(teacher, jax.tree.map(jnp.add, theta, d), x, labels,
                                     offsets[0], cfg)[1]
  for _ in range(cfg.adjust_steps):
    g_theta, g_x = jax.grad(ce_of, argnums=(0, 1))(delta, x)
    norm = jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(g_theta)))
    delta = jax.tree.map(lambda d, g: d + (cfg.rho / cfg.adjust_steps) * g / (norm + 1e-12),
                         delta, g_theta)
    leaked = leaked + np.asarray(g_x, np.float64)
  np.testing.assert_allclose(metrics["delta_norm"], optax.tree.norm(delta), rtol=1e-5)
  grad_at = lambda t, x: jax.grad(lambda x: _loss_by_hand(
      teacher, jax.tree.map(jnp.add, theta, delta), x, labels, offsets[t], cfg)[0])(x)
  np.testing.assert_allclose(images, _adam_by_hand(grad_at, x, cfg, leaked), rtol=1e-4,
                             atol=1e-4)


def test_synthesis_lowers_the_loss_and_respects_pixel_range(teacher, batch):
  x, labels = batch
  cfg = synthesis.SynthesisConfig(iterations=40, lr=0.1, adjust_steps=2, rho=0.05)
  offsets = synthesis.draw_jitter_offsets(jax.random.key(3), 40, 2)
  images, metrics = _synthesize(teacher, x, labels, cfg, offsets)
  loss = metrics["ce"] + cfg.r_bn * (metrics["bn_terms"] @ np.array([10.0, 1.0]))
  assert float(loss[-5:].mean()) < 0.75 * float(loss[:5].mean())
  lo, hi = synthesis.pixel_bounds(MEAN, STD, jnp.float32)
  assert np.all(images >= lo - 1e-6) and np.all(images <= hi + 1e-6)
  assert 0 < float(metrics["delta_norm"]) <= 0.05 + 1e-6
  assert metrics["bn_terms"].shape == (40, 2) and metrics["adjust_ce"].shape == (2,)


def test_random_ablation_and_methods_differ(teacher, batch):
  x, labels = batch
  offsets = jnp.zeros((3, 2), jnp.int32)
  outs = {m: _synthesize(teacher, x, labels,
                         synthesis.SynthesisConfig(method=m, iterations=3, adjust_steps=2), offsets)
          for m in synthesis.METHODS}
  np.testing.assert_allclose(outs["random"][1]["delta_norm"], 0.015, rtol=1e-4)
  assert not np.allclose(outs["dwa"][0], outs["sre2l"][0])
  assert not np.allclose(outs["random"][0], outs["dwa"][0])


def test_no_teacher_weight_gradients_are_computed(teacher, batch):
  """The synthesis step costs a forward + input-gradient pass, not a full weight backward."""
  model, variables = teacher
  x, labels = batch
  bn_paths = paths(teacher)
  cfg = synthesis.sre2l_config(iterations=1)
  weights = synthesis.bn_layer_weights(len(bn_paths), 10.0)
  loss = lambda p, x: synthesis.synthesis_loss(model, p, variables["batch_stats"], x, labels,
                                             bn_paths, weights, cfg)[0]

  def flops(fn, *args):
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]

  input_only = flops(jax.grad(loss, argnums=1), variables["params"], x)
  with_weights = flops(jax.grad(loss, argnums=(0, 1)), variables["params"], x)
  synth = functools.partial(synthesis.synthesize_batch, model, bn_paths=bn_paths, pixel_mean=MEAN,
                            pixel_std=STD, cfg=cfg)
  engine = flops(synth, variables, x, labels, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
  assert with_weights > 1.2 * input_only  # the weight gradient is a real extra cost here...
  assert engine < 0.5 * (input_only + with_weights)  # ...which the engine does not pay


@pytest.mark.parametrize("bad,match", [
    (dict(method="dwa2"), "method must be one of"),
    (dict(r_bn=-1.0), "r_bn must be >= 0"),
    (dict(iterations=0), "iterations must be >= 1"),
    (dict(adjust_steps=0), "adjust_steps"),
    (dict(augment="mixup"), "augment must be"),
])
def test_config_validation(bad, match):
  with pytest.raises(ValueError, match=match):
    synthesis.SynthesisConfig(**bad)


def test_unreadable_inflight_checkpoint_restarts_the_group(tmp_path):
  """A SIGKILL in the middle of an Orbax save leaves a step Orbax cannot read: start over."""
  cfg = synthesis.SynthesisConfig(iterations=4)
  x = jnp.ones((1, 2, 4, 4, 3), jnp.float32)  # a group of one batch, stacked
  state = synthesis.BatchState(x, synthesis._adam(cfg).init(x), None, jnp.zeros_like(x),
                             jnp.asarray([2], jnp.int32))
  progress = progress_lib.Progress(tmp_path / "progress", {"a": 1})
  progress.save_inflight("0:0", state)
  restored = progress.load_inflight("0:0", state._replace(t=jnp.asarray([0], jnp.int32)))
  assert int(restored.t[0]) == 2
  for f in (tmp_path / "progress").rglob("*"):
    if f.is_file() and "steps_p0/" in str(f):
      f.write_bytes(b"")  # truncated, as a kill mid-write leaves it
  assert progress.load_inflight("0:0", state) is None
  assert progress.store.latest() is None


def test_crop_flip_roll_draws_and_view():
  cfg = synthesis.SynthesisConfig(iterations=200, augment="crop_flip_roll", jitter=3)
  draws = synthesis.draw_augmentation(jax.random.key(0), 200, cfg, (14, 14))
  crop, flip, roll = (np.asarray(a) for a in (draws.crop, draws.flip, draws.roll))
  assert crop.shape == (200, 4) and flip.shape == (200,) and roll.shape == (200, 2)
  top, left, h, w = crop.T
  assert np.all((top >= 0) & (left >= 0) & (h >= 1) & (w >= 1))
  assert np.all((top + h <= 14) & (left + w <= 14)) and np.any(h != w)
  assert 0.3 < flip.mean() < 0.7 and set(np.unique(roll)) == {0, 1, 2, 3}
  # Roll-only draws are the CIFAR stream, unchanged by the crop draws.
  plain = synthesis.draw_augmentation(jax.random.key(0), 200, synthesis.SynthesisConfig(
      iterations=200, jitter=3), (14, 14))
  assert plain.crop is None
  np.testing.assert_array_equal(plain.roll, roll)
  # The view: crop + resize, flip after the resize, then roll; one transform for the batch.
  from dwa_jax import augment  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(1), (3, 14, 14, 2))
  t = int(np.flatnonzero(flip)[0])
  view = synthesis.synthesis_view(x, draws.at(t), "crop_flip_roll")
  resized = np.asarray(augment.crop_and_resize(x, crop[t], 14))
  expected = np.roll(resized[:, :, ::-1], tuple(roll[t]), axis=(1, 2))
  np.testing.assert_allclose(view, expected, rtol=1e-6)


def test_bfloat16_compute_stays_close_to_float32(teacher, batch):
  """recover.precision='bfloat16': the convolutions and matmuls read bfloat16 operands and sum
  in float32 (the jaxpr's convolutions), pixels, Δθ, losses and BN statistics stay float32, and a short synthesis
  stays close to the float32 one: final CE and BN loss within 5 % relative, and the mean pixel
  difference under 10 % of how far the pixels moved (measured 1.3 %; CE 1.3435 vs 1.3432)."""
  x, labels = batch
  offsets = synthesis.draw_jitter_offsets(jax.random.key(3), 30, 2)
  runs = {}
  for dtype in (None, "bfloat16"):
    cfg = synthesis.SynthesisConfig(iterations=30, lr=0.1, adjust_steps=2, rho=0.05,
                                  compute_dtype=dtype)
    runs[dtype] = _synthesize(teacher, x, labels, cfg, offsets)
  (x32, m32), (x16, m16) = runs[None], runs["bfloat16"]
  assert x16.dtype == jnp.float32 and m16["ce"].dtype == jnp.float32
  for name in ("ce", "bn_terms"):
    np.testing.assert_allclose(np.asarray(m16[name][-1]), np.asarray(m32[name][-1]), rtol=0.05)
  moved = float(np.abs(np.asarray(x32) - np.asarray(x)).mean())
  apart = float(np.abs(np.asarray(x16) - np.asarray(x32)).mean())
  print(f"bfloat16: mean |Δx| {apart:.3g} = {apart / moved:.1%} of the movement; final CE "
        f"{float(m16['ce'][-1]):.4f} vs {float(m32['ce'][-1]):.4f}")
  assert apart < 0.1 * moved
  # The convolutions really read bfloat16, and return float32 sums.
  model, variables = teacher
  bn_paths = paths(teacher)
  jaxpr = jax.make_jaxpr(lambda v, x: synthesis.forward_with_bn_stats(
      model, v["params"], v["batch_stats"], x, bn_paths, "bfloat16"))(variables, x)
  convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert convs and all(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars)
  assert all(e.outvars[0].aval.dtype == jnp.float32 for e in convs)


def run_packed(model, variables, cfg, x0, labels, keys, draws, per_device):
  """The batches of x0 through a one-device GroupRunner, `per_device` at a time; returns the
  runner and the final images."""
  runner = device_dispatch.GroupRunner(model, variables, IMAGE, MEAN, STD, cfg, jax.devices()[:1],
                               per_device)
  out = []
  for g in range(0, len(x0), per_device):
    sel = slice(g, g + per_device)
    group, _ = runner.start(x0[sel], labels[sel], [k[1] for k in keys[sel]], draws[sel])
    runner.advance(group, cfg.iterations)
    out += [group.x(k) for k in range(group.count)]
  return runner, np.stack(out)


def test_packed_batches_match_one_by_one(teacher):
  """batches_per_device = P: P batches in one vmapped program per device give the images of
  running them one at a time, within float32 rounding (measured max |Δ| 3.1e-6 here)."""
  model, variables = teacher
  cfg = synthesis.SynthesisConfig(iterations=5, adjust_steps=2, jitter=2)
  keys = [jax.random.split(recover.batch_key(0, i, 0)) for i in range(4)]
  x0 = np.stack([np.asarray(jax.random.normal(k[0], (NUM_CLASSES, *IMAGE))) for k in keys])
  labels = np.tile(np.arange(NUM_CLASSES), (4, 1))
  draws = [recover.batch_draws(0, i, 0, cfg, IMAGE[:2]) for i in range(4)]
  images = {}
  for per_device in (1, 4):
    runner, images[per_device] = run_packed(model, variables, cfg, x0, labels, keys, draws,
                                            per_device)
    assert runner.compilations() == {"start": 1, "advance": 2}  # blocks of 4 and 1 iterations
  # One batch on one device vs the unbatched pure maths (synthesize_batch): float32 rounding
  # only (a vmap of one batch is compiled differently, and a scan instead of unrolled blocks).
  synth = jax.jit(functools.partial(
      synthesis.synthesize_batch, model, bn_paths=synthesis.bn_layer_paths(model, variables, IMAGE),
      pixel_mean=MEAN, pixel_std=STD, cfg=cfg))
  for i in range(4):
    alone, _ = synth(variables, x0[i], labels[i], keys[i][1], draws[i])
    np.testing.assert_allclose(images[1][i], np.asarray(alone), atol=1e-4)
  print(f"packed vs one by one: max |Δ| {np.abs(images[4] - images[1]).max():.3g}")
  np.testing.assert_allclose(images[4], images[1], atol=1e-4)


def test_packed_batches_compute_the_same_maths_in_float64(teacher):
  """In float64 packing changes nothing but rounding (measured max |Δ| ~1e-15 on the tiny
  teacher; 2.9e-12 on a ResNet-18 after an iteration): float32 differences between layouts are
  rounding, which Adam's sign-like first steps amplify at pixels whose gradient is ~0."""
  model, variables = teacher
  cfg = synthesis.SynthesisConfig(iterations=3, adjust_steps=2, jitter=2)
  with jax.enable_x64(True):
    variables64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    keys = [jax.random.split(recover.batch_key(0, i, 0)) for i in range(2)]
    x0 = np.stack([np.asarray(jax.random.normal(k[0], (NUM_CLASSES, *IMAGE), jnp.float64))
                   for k in keys])
    labels = np.tile(np.arange(NUM_CLASSES), (2, 1))
    draws = [recover.batch_draws(0, i, 0, cfg, IMAGE[:2]) for i in range(2)]
    images = {p: run_packed(model, variables64, cfg, x0, labels, keys, draws, p)[1]
              for p in (1, 2)}
  assert images[1].dtype == np.float64
  np.testing.assert_allclose(images[2], images[1], atol=1e-9)


def test_scanned_ascent_and_iterations_compute_what_the_unrolled_ones_do(teacher):
  """Accelerators run DWA's K ascent passes and the iterations as `lax.scan`s (scratch memory of
  one pass, whatever K), the CPU unrolled: the same images in float64 (1e-12) and within float32
  rounding (measured max |Δ| 2e-6 here), with the same compiled-program counts."""
  model, variables = teacher
  cfg = synthesis.SynthesisConfig(iterations=6, adjust_steps=3, jitter=2)
  keys = [jax.random.split(recover.batch_key(0, i, 0)) for i in range(2)]
  draws = [recover.batch_draws(0, i, 0, cfg, IMAGE[:2]) for i in range(2)]
  labels = np.tile(np.arange(NUM_CLASSES), (2, 1))

  def run(variables, x0, unroll):
    runner = device_dispatch.GroupRunner(model, variables, IMAGE, MEAN, STD, cfg, jax.devices()[:1], 2,
                                 unroll=unroll)
    group, start = runner.start(x0, labels, [k[1] for k in keys], draws)
    runner.advance(group, cfg.iterations)
    return np.stack([group.x(k) for k in range(2)]), start, runner.compilations()

  x0 = np.stack([np.asarray(jax.random.normal(k[0], (NUM_CLASSES, *IMAGE))) for k in keys])
  (unrolled, s_u, c_u), (scanned, s_s, c_s) = (run(variables, x0, u) for u in (True, False))
  assert c_u == {"start": 1, "advance": 2} and c_s == {"start": 1, "advance": 1}
  np.testing.assert_allclose(scanned, unrolled, atol=1e-4)
  np.testing.assert_allclose(s_s[0]["delta_norm"], s_u[0]["delta_norm"], rtol=1e-5)
  with jax.enable_x64(True):
    v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    (u64, _, _), (s64, _, _) = (run(v64, x0.astype(np.float64), u) for u in (True, False))
  np.testing.assert_allclose(s64, u64, atol=1e-12)
