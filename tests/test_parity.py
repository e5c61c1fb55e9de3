"""Float64 parity with a recording of the authors' PyTorch DWA code (../shared/parity).

One CIFAR-10 batch, ResNet-18 (CIFAR stem), T = 20, K = 12, recorded jitter offsets, driven
through the config path: configs/cifar10_dwa.py with `compat=official` (what
`--config.compat=official` sets), resolved as the pipeline resolves it, gives the recording's
settings (quirk Q1 on, the authors' CIFAR-10 std), and the recover stage's engine driver
(GroupRunner: the weight adjustment, then blocks of unrolled iterations) runs the batch.
"""

import json
import os
import pathlib

# Float64 convolutions are ~6x slower with dwa_jax's tuned XLA:CPU options (see xla_cpu.py).
os.environ.setdefault("DWA_JAX_XLA_DEFAULTS", "0")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SHARED_DIR, official_config, parity_recording
from dwa_jax import synthesis
from dwa_jax import device_dispatch
from dwa_jax import compat, convert, data, recover
from dwa_jax.models import build_model

FIXTURE = SHARED_DIR / "parity" / "cifar10_resnet18_fp64"
pytestmark = parity_recording(FIXTURE)

# The official CIFAR-10 synthesis normalisation (note its std differs from the true CIFAR-10 std).
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CONFIG_FILE = pathlib.Path(__file__).resolve().parents[1] / "configs" / "cifar10_dwa.py"
IMAGE_SHAPE = (32, 32, 3)
REL_TOL, ABS_TOL = 1e-9, 1e-8


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def run():
  return compute()


def compute():
  """Runs the recorded batch once in float64; returns numpy results and the recording."""
  record = json.loads((FIXTURE / "record.json").read_text())
  expected = dict(np.load(FIXTURE / "expected.npz"))
  config = official_config(CONFIG_FILE, len(record["jitter_offsets"]))
  # What the recover stage runs for one class-chunk (CIFAR-10: all 10 classes in one batch).
  cfg = recover.engine_config(recover.synthesis_config(config.recover, "dwa"),
                              len(recover.class_chunks(10, config.recover.classes_per_batch)))
  # The teacher was trained with the true CIFAR-10 normalisation, as the authors' was.
  mean, std = compat.pixel_normalisation(config, dict(zip(("mean", "std"),
                                                          data.NORMALISATION["cifar10"])))
  with jax.enable_x64(True):
    model = build_model("resnet18_cifar", 10)
    state_dict = convert.load_npz_state_dict(str(FIXTURE / "teacher.npz"))
    variables = convert.state_dict_to_variables(
        state_dict, convert.model_template(model, IMAGE_SHAPE), dtype=jnp.float64)
    x0 = jnp.asarray(np.load(FIXTURE / "init_ipc0.npy").astype(np.float64).transpose(0, 2, 3, 1))
    labels = jnp.arange(10)
    offsets = jnp.asarray(record["jitter_offsets"])
    runner = device_dispatch.GroupRunner(model, variables, IMAGE_SHAPE, mean, std, cfg, jax.devices()[:1])
    key, draws = jax.random.key(0), synthesis.AugmentDraws(offsets)
    group, [start_metrics] = runner.start([x0], [labels], [key], [draws])
    # Δθ and Q1's ascent gradient, copied before the iterations consume (donate) the state.
    delta = jax.tree.map(lambda a: np.asarray(a[0]), group.state.delta)
    ascent_grad = np.asarray(group.state.first_grad_extra[0])
    [metrics] = runner.advance(group, cfg.iterations)
    images, metrics = group.x(0), {**metrics, **start_metrics}

    # The first Adam step's gradient, assembled from the public pieces.
    bn_paths = synthesis.bn_layer_paths(model, variables, IMAGE_SHAPE)
    params = jax.tree.map(jnp.add, variables["params"], delta)
    layer_w = synthesis.bn_layer_weights(len(bn_paths), cfg.first_bn_weight)
    loss = lambda x: synthesis.synthesis_loss(
        model, params, variables["batch_stats"], synthesis.synthesis_view(x, offsets[0], "roll"),
        labels, bn_paths, layer_w, cfg)[0]
    first_grad = jax.jit(jax.grad(loss))(x0) + ascent_grad  # compiled: op by op takes longer
    assert images.dtype == jnp.float64
    return dict(cfg=cfg, normalisation=(mean, std), record=record, expected=expected,
                images=nchw(images),
                metrics=jax.tree.map(np.asarray, metrics), first_grad=nchw(first_grad),
                delta=convert.variables_to_state_dict({"params": delta}))


def test_official_preset_has_the_recorded_settings(run):
  """compat=official turns on Q1 and the authors' std; everything else is the CIFAR default."""
  assert run["cfg"] == synthesis.SynthesisConfig(
      iterations=20, lr=0.25, r_bn=0.01, r_var=11.0, first_bn_weight=10.0, adjust_steps=12,
      rho=0.015, jitter=4, augment="roll", compat_q1=True)
  assert run["normalisation"] == (MEAN, STD)


def max_rel(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape
  return float(np.max(np.abs(actual - expected) / np.abs(expected)))


def test_cross_entropy_every_forward(run):
  m = run["metrics"]
  ce = np.concatenate([m["adjust_ce"], m["ce"]])
  assert len(run["record"]["ce"]) == 12 + 20
  assert max_rel(ce, run["record"]["ce"]) <= REL_TOL


def test_bn_terms_every_forward(run):
  m = run["metrics"]
  terms = np.concatenate([m["adjust_bn_terms"], m["bn_terms"]])
  assert terms.shape == (32, 20)
  assert max_rel(terms, run["record"]["bn_terms_per_forward"]) <= REL_TOL


def test_gradient_norms_and_learning_rates(run):
  assert max_rel(run["metrics"]["grad_norm"], run["record"]["image_grad_norm_per_step"]) <= REL_TOL
  np.testing.assert_allclose(run["metrics"]["lr"], run["record"]["lr_per_step"], rtol=0, atol=1e-15)


def test_delta_theta(run):
  record, delta = run["record"], run["delta"]
  per_tensor = record["delta_theta_norm_per_tensor"]
  # Every trainable tensor moved as recorded; BN running statistics are not part of Δθ.
  assert set(delta) == {k for k in per_tensor if not k.endswith(("running_mean", "running_var"))}
  assert all(per_tensor[k] == 0.0 for k in per_tensor if k not in delta)
  for name, value in delta.items():
    np.testing.assert_allclose(np.linalg.norm(value), per_tensor[name], rtol=0, atol=1e-12,
                               err_msg=name)
  np.testing.assert_allclose(run["metrics"]["delta_norm"], record["delta_theta_norm_total"],
                             rtol=REL_TOL)
  np.testing.assert_allclose(delta["fc.bias"], run["expected"]["fc_bias_delta"], rtol=0, atol=1e-15)
  np.testing.assert_allclose(delta["bn1.weight"], run["expected"]["bn1_weight_delta"],
                             rtol=0, atol=1e-15)


def test_first_step_gradient(run):
  np.testing.assert_allclose(run["first_grad"], run["expected"]["first_step_image_grad"],
                             rtol=0, atol=ABS_TOL)


def test_final_images(run):
  np.testing.assert_allclose(run["images"], run["expected"]["final_images"], rtol=0, atol=ABS_TOL)


def report(r) -> dict:
  """Max differences against the recording (`python tests/test_parity.py` prints them)."""
  m, record, expected = r["metrics"], r["record"], r["expected"]
  per_tensor = record["delta_theta_norm_per_tensor"]
  return {
      "ce_max_rel": max_rel(np.concatenate([m["adjust_ce"], m["ce"]]), record["ce"]),
      "bn_terms_max_rel": max_rel(np.concatenate([m["adjust_bn_terms"], m["bn_terms"]]),
                                  record["bn_terms_per_forward"]),
      "grad_norm_max_rel": max_rel(m["grad_norm"], record["image_grad_norm_per_step"]),
      "delta_norm_per_tensor_max_abs": max(abs(float(np.linalg.norm(v)) - per_tensor[k])
                                           for k, v in r["delta"].items()),
      "first_step_grad_max_abs": float(np.max(np.abs(r["first_grad"]
                                                     - expected["first_step_image_grad"]))),
      "final_images_max_abs": float(np.max(np.abs(r["images"] - expected["final_images"]))),
  }


if __name__ == "__main__":
  print(json.dumps(report(compute()), indent=1))
