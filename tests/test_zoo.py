"""The torchvision model zoo without torch: logits against committed torchvision outputs, layers
against their torch definitions, and every model as a trainable student.

tests/fixtures/torch_outputs.npz holds torchvision's logits for weights that
tests/fixtures/make_torch_fixture.py regenerates here from a seed (see that script).
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dwa_jax import convert, presets
from dwa_jax.models import MODELS, build_model
from dwa_jax.models.efficientnet import drop_rows
from dwa_jax.models.layers import BN_STATS, adaptive_avg_pool, dropout
from dwa_jax.models.shufflenet import channel_shuffle
from fixtures import make_torch_fixture as fixture

NEW_MODELS = ("mobilenet_v2", "shufflenet_v2_x1_0", "efficientnet_b0", "vgg16_bn")
TOLERANCE = 1e-4  # absolute, on logits of magnitude <= ~9 (printed by the fixture script)


@pytest.fixture(scope="module")
def torch_outputs():
  with np.load(fixture.FIXTURE) as f:
    return {k: f[k] for k in f.files}


@pytest.mark.parametrize("name", list(fixture.ARCHS))
def test_logits_match_torchvision_fixture(name, torch_outputs):
  seed = int(torch_outputs[f"{name}/seed"])
  x = torch_outputs[f"{name}/input"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
  expected = torch_outputs[f"{name}/logits"]
  np.testing.assert_array_equal(x, fixture.make_input(name, seed).transpose(0, 2, 3, 1))
  model = build_model(name, fixture.NUM_CLASSES)
  variables = convert.state_dict_to_variables(fixture.numpy_state_dict(name, seed),
                                              convert.model_template(model, x.shape[1:]))
  logits = np.asarray(jax.jit(model.apply)(variables, x))
  diff = np.abs(logits - expected).max()
  print(f"{name}: max |logit diff| {diff:.2e} (max |logit| {np.abs(expected).max():.2f})")
  assert diff < TOLERANCE


def test_torch_names_of_nested_sequentials_and_depthwise_layout():
  sd = convert.variables_to_state_dict(jax.tree.map(
      lambda l: np.zeros(l.shape, np.float32),
      convert.model_template(build_model("efficientnet_b0", 10), (32, 32, 3))))
  assert sd["features.1.0.block.0.0.weight"].shape == (32, 1, 3, 3)  # depthwise, torch layout
  assert sd["features.2.0.block.2.fc1.weight"].shape == (4, 96, 1, 1)
  assert sd["classifier.1.weight"].shape == (10, 1280)
  names = set(convert.variables_to_state_dict(jax.tree.map(
      lambda l: np.zeros(l.shape, np.float32),
      convert.model_template(build_model("mobilenet_v2", 10), (32, 32, 3)))))
  assert {"features.1.conv.0.0.weight", "features.1.conv.2.running_var",
          "features.2.conv.1.1.weight", "features.18.1.bias"} <= names
  kernel = convert.model_template(build_model("mobilenet_v2", 10), (32, 32, 3))
  assert kernel["params"]["features_1"]["conv_0_0"]["kernel"].shape == (3, 3, 1, 32)  # HWIO


def _torch_adaptive_avg_pool(x, out):
  """torch's definition on one image (H, W): bin i = [floor(i*H/out), ceil((i+1)*H/out))."""
  h, w = x.shape
  rows = [(i * h // out, -(-(i + 1) * h // out)) for i in range(out)]
  cols = [(j * w // out, -(-(j + 1) * w // out)) for j in range(out)]
  return np.array([[x[a:b, c:d].mean() for c, d in cols] for a, b in rows])


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 10, 13])
def test_adaptive_avg_pool_follows_torch_bins(size):
  x = np.random.default_rng(size).normal(size=(2, size, size + 1, 3)).astype(np.float32)
  y = np.asarray(adaptive_avg_pool(jnp.asarray(x), (7, 7)))
  assert y.shape == (2, 7, 7, 3)
  for b in range(2):
    for c in range(3):
      np.testing.assert_allclose(y[b, :, :, c], _torch_adaptive_avg_pool(x[b, :, :, c], 7),
                                 rtol=1e-6, atol=1e-6)


def test_adaptive_avg_pool_replicates_a_1x1_map():
  # torchvision VGG on 32x32 inputs: the 1x1 final map becomes 49 copies before the classifier.
  x = np.random.default_rng(0).normal(size=(2, 1, 1, 5)).astype(np.float32)
  np.testing.assert_array_equal(adaptive_avg_pool(jnp.asarray(x), (7, 7)),
                                np.broadcast_to(x, (2, 7, 7, 5)))


def test_channel_shuffle_matches_torch_view_transpose():
  x = np.arange(2 * 3 * 3 * 8, dtype=np.float32).reshape(2, 3, 3, 8)
  nchw = x.transpose(0, 3, 1, 2)
  torch_way = nchw.reshape(2, 2, 4, 3, 3).transpose(0, 2, 1, 3, 4).reshape(2, 8, 3, 3)
  np.testing.assert_array_equal(channel_shuffle(jnp.asarray(x), 2),
                                torch_way.transpose(0, 2, 3, 1))


def _variables(name: str, seed: int = 0):
  """Well-scaled variables from the fixture generator: model.init on CPU costs 5-20 s per model
  (its initialisers compile op by op), the numpy generator well under a second."""
  model = build_model(name, 10)
  return model, convert.state_dict_to_variables(
      fixture.numpy_state_dict(name, seed), convert.model_template(model, (32, 32, 3)))


@pytest.mark.parametrize("name", NEW_MODELS)
def test_new_models_work_as_students_and_teachers(name):
  model, variables = _variables(name)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  y = jnp.array([1, 7])

  def loss_fn(params, batch_stats):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                  mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

  # Student: one training forward (batch statistics, running averages updated) runs for real;
  # the gradient runs for real on ShuffleNet and is traced abstractly on the others (compiling a
  # backward pass costs 15-40 s per model here).
  loss, updates = jax.jit(loss_fn)(variables["params"], variables["batch_stats"])
  if name == "shufflenet_v2_x1_0":
    grads, _ = jax.jit(jax.grad(loss_fn, has_aux=True))(variables["params"],
                                                        variables["batch_stats"])
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and np.mean(np.asarray(norms) > 0) > 0.9
  assert np.isfinite(loss)
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), variables["batch_stats"],
                       updates["batch_stats"])
  assert np.mean(jax.tree.leaves(moved)) > 0.9  # (a BN after an all-zero input may stay put)
  grads, _ = jax.eval_shape(jax.grad(loss_fn, has_aux=True), variables["params"],
                            variables["batch_stats"])
  assert jax.tree.map(lambda g: (g.shape, g.dtype), grads) == jax.tree.map(
      lambda p: (p.shape, p.dtype), variables["params"])
  assert jax.tree.structure(jax.eval_shape(model.init, jax.random.key(0), x)) == \
      jax.tree.structure(variables)

  # Teacher (recover): every BatchNorm sows its input statistics.
  _, state = jax.eval_shape(lambda v: model.apply(v, x, capture_stats=True, mutable=[BN_STATS]),
                            variables)
  n_bn = len(jax.tree.leaves(variables["batch_stats"])) // 2
  assert len(flax.traverse_util.flatten_dict(flax.core.unfreeze(state[BN_STATS]))) == n_bn

  cfg = presets.cifar("cifar10")
  cfg.teacher.model = cfg.relabel.student = name
  presets.resolve(cfg)


class _DropoutNet(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    return dropout(self, x, 0.5, train)


def test_dropout_only_when_training_with_a_key():
  x, net, keyed = jnp.ones((4, 8)), _DropoutNet(), {"dropout": jax.random.key(1)}
  np.testing.assert_array_equal(net.apply({}, x, train=True), x)  # no key: off (pipeline loops)
  np.testing.assert_array_equal(net.apply({}, x, rngs=keyed), x)  # eval: off
  y = np.asarray(net.apply({}, x, train=True, rngs=keyed))
  assert set(np.unique(y)) == {0.0, 2.0}


def test_stochastic_depth_drops_whole_rows_and_rescales():
  x = jnp.ones((64, 2, 2, 3))
  y = np.asarray(drop_rows(jax.random.key(0), x, 0.25))
  per_row = y.reshape(64, -1)
  assert all(len(set(r)) == 1 for r in per_row) and set(per_row[:, 0]) == {0.0, np.float32(1 / 0.75)}


def test_zoo_lists_every_model():
  assert set(NEW_MODELS) <= set(MODELS)
