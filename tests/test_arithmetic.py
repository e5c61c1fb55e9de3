"""DWA's Δθ under accelerator arithmetic, emulated on the CPU: bfloat16 (TPU default, and
recover.precision='bfloat16') and TF32 (Ampere+ GPU default) read weights with 7 and 10 mantissa
bits, which rounds a direct θ + Δθ into noise; the split form layer(x; θ) + layer(x; Δθ) keeps
Δθ. Also: the split form is the same maths, and the recover stage picks the form per backend."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dwa_jax import arithmetic, presets, recover, synthesis
from dwa_jax.models import build_model


def random_delta(params, rho=0.015, seed=0):
  """A random direction of global norm rho, shaped like params."""
  leaves, treedef = jax.tree.flatten(params)
  noise = [jax.random.normal(jax.random.key(seed + i), a.shape) for i, a in enumerate(leaves)]
  noise = jax.tree.unflatten(treedef, noise)
  return jax.tree.map(lambda a: a * (rho / optax.tree.norm(noise)), noise)


def test_round_mantissa_is_the_bfloat16_cast():
  a = jax.random.normal(jax.random.key(0), (100_000,)) * 10.0 ** jax.random.randint(
      jax.random.key(1), (100_000,), -6, 6)
  np.testing.assert_array_equal(arithmetic.round_mantissa(a, 7),
                                a.astype(jnp.bfloat16).astype(jnp.float32))
  tf32 = np.asarray(arithmetic.round_mantissa(a, 10))
  assert np.all(np.abs(tf32 - np.asarray(a)) <= np.abs(np.asarray(a)) * 2.0**-11)
  np.testing.assert_array_equal(arithmetic.round_mantissa(a, 23), a)


@pytest.fixture(scope="module")
def resnet18_params():
  model = build_model("resnet18", 1000)  # (its parameters do not depend on the image size)
  return jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]


def test_a_direct_delta_is_rounding_noise_and_the_split_form_keeps_it(resnet18_params):
  """A random-init ImageNet ResNet-18 (‖θ‖ = 116) and a random Δθ of norm 0.015, as the weights
  the layers see: θ + Δθ read in bfloat16 turns into a perturbation 4.6x too large at cosine 0.22
  with Δθ, in TF32 1.7x at 0.60; split, both keep Δθ (cosine >= 0.99, norm within 1 %)."""
  params = resnet18_params
  assert float(optax.tree.norm(params)) == pytest.approx(116, abs=1)
  delta = random_delta(params)
  survival = jax.jit(arithmetic.survival, static_argnums=(2, 3))
  direct = {bits: survival(params, delta, bits, "direct") for bits in (7, 10)}
  assert float(direct[7]["delta_norm_ratio"]) == pytest.approx(4.6, rel=0.05)
  assert float(direct[7]["delta_cosine"]) == pytest.approx(0.22, abs=0.02)
  assert float(direct[10]["delta_norm_ratio"]) == pytest.approx(1.7, rel=0.05)
  assert float(direct[10]["delta_cosine"]) == pytest.approx(0.60, abs=0.02)
  for bits in (7, 10, None):
    kept = survival(params, delta, bits, "split")
    assert float(kept["delta_cosine"]) >= 0.99
    assert abs(float(kept["delta_norm_ratio"]) - 1) <= 0.01
  exact = survival(params, delta, None, "direct")
  assert float(exact["delta_cosine"]) > 0.9999


def convnet_case(shape=(8, 16, 16, 3)):
  model = build_model("convnet", 10)
  variables = model.init(jax.random.key(0), jnp.zeros(shape))
  x = jax.random.normal(jax.random.key(1), shape)
  paths = synthesis.bn_layer_paths(model, variables, shape[1:])
  return model, variables, x, paths, random_delta(variables["params"], seed=7)


def test_the_split_form_is_the_same_maths():
  """In exact arithmetic layer(x; θ + Δθ) = layer(x; θ) + layer(x; Δθ): float64 logits and BN
  statistics agree to 1e-12, float32 to rounding."""
  model, variables, x, paths, delta = convnet_case()
  with jax.enable_x64(True):
    v64, d64 = (jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t) for t in (variables, delta))
    forward = jax.jit(lambda v, x, d, form: synthesis.forward_with_bn_stats(
        model, v["params"], v["batch_stats"], x, paths, None, d, form), static_argnums=3)
    out = {form: forward(v64, jnp.asarray(x, jnp.float64), d64, form)
           for form in synthesis.DELTA_FORMS}
  for a, b in zip(jax.tree.leaves(out["direct"]), jax.tree.leaves(out["split"])):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
  out32 = {form: forward(variables, x, delta, form) for form in synthesis.DELTA_FORMS}
  np.testing.assert_allclose(out32["split"][0], out32["direct"][0], rtol=1e-4, atol=1e-5)


def test_the_split_form_keeps_the_effect_on_the_teacher_in_emulated_arithmetic():
  """The effect of Δθ on the logits, f(θ + Δθ) − f(θ), under emulated TF32 and bfloat16 inputs
  and weights (float32 products and sums), averaged over 32 inputs dithered by N(0, 0.01) (the
  rounding of activations makes any one forward noisy; its mean is the effect): split, it
  converges to the exact effect; direct, it stays another one. Measured: TF32 cosine 0.999 split
  vs 0.94 direct, bfloat16 0.95 vs -0.28."""
  model, variables, x0, paths, delta = convnet_case()

  @jax.jit
  def effects(x):
    f = lambda form, d, bits: synthesis.forward_with_bn_stats(
        model, variables["params"], variables["batch_stats"], x, paths, None, d, form, bits)[0]
    out = {"exact": f("direct", delta, None) - f("direct", None, None)}
    for bits in (7, 10):
      base = f("direct", None, bits)
      for form in synthesis.DELTA_FORMS:
        out[f"{form}{bits}"] = f(form, delta, bits) - base
    return out

  total = None
  for k in range(32):
    e = effects(x0 + 0.01 * jax.random.normal(jax.random.key(100 + k), x0.shape))
    total = e if total is None else jax.tree.map(jnp.add, total, e)
  exact = np.asarray(total["exact"]).ravel()
  cos = {k: float(np.dot(np.asarray(v).ravel(), exact) / np.linalg.norm(v) / np.linalg.norm(exact))
         for k, v in total.items() if k != "exact"}
  assert cos["split10"] > 0.99 and cos["direct10"] < 0.97
  assert cos["split7"] > 0.9 and cos["direct7"] < 0.5


def test_bfloat16_runs_the_split_convolutions_in_bfloat16():
  model, variables, x, paths, delta = convnet_case()
  jaxpr = jax.make_jaxpr(lambda v, d, x: synthesis.forward_with_bn_stats(
      model, v["params"], v["batch_stats"], x, paths, "bfloat16", d, "split"))(variables, delta, x)
  convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert len(convs) == 6 and all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in convs)


def test_the_recover_stage_picks_the_form_per_backend():
  rc = presets.resolve(presets.base_config()).recover
  cfg = recover.synthesis_config(rc, "dwa", "cpu")
  assert (cfg.delta_form, cfg.weight_bits) == ("direct", None)
  for platform, bits in (("tpu", 7), ("gpu", 10)):
    cfg = recover.synthesis_config(rc, "dwa", platform)
    assert (cfg.delta_form, cfg.weight_bits) == ("split", bits)
  rc.precision = "bfloat16"
  cfg = recover.synthesis_config(rc, "dwa", "cpu")
  assert (cfg.delta_form, cfg.weight_bits) == ("split", 7)
  rc.precision, rc.emulate_tf32 = "float32", True
  cfg = recover.synthesis_config(rc, "dwa", "cpu")  # the authors' A100s: direct, in TF32
  assert (cfg.delta_form, cfg.weight_bits, cfg.emulate_bits) == ("direct", 10, 10)
  rc.emulate_tf32, rc.delta_form = False, "split"
  assert recover.synthesis_config(rc, "dwa", "cpu").delta_form == "split"


def test_recover_records_how_much_of_delta_survived(tmp_path):
  """recover.json's batches (and metrics.jsonl, hence TensorBoard) carry the Δθ-survival figure
  of the arithmetic that ran: exact on the CPU in float32; with bfloat16 convolutions, kept by
  the split form that `auto` picks there, and blurred by the direct form (measured on the
  digits teacher: cosine 0.99999 against 0.51)."""
  import json  # pylint: disable=g-import-not-at-top
  from dwa_jax import files, squeeze  # pylint: disable=g-import-not-at-top
  from dwa_jax.testing import tiny_config as tiny  # pylint: disable=g-import-not-at-top
  config = tiny()
  config.stage = "squeeze"
  squeeze.run(presets.resolve(config), tmp_path)
  figures, images = {}, {}
  for precision, form, tf32 in (("float32", "auto", True), ("float32", "auto", False),
                                ("bfloat16", "auto", False), ("bfloat16", "direct", False)):
    config.recover.precision, config.recover.delta_form = precision, form
    config.recover.emulate_tf32 = tf32
    summary = recover.run(presets.resolve(config), tmp_path, "dwa")
    images[precision, tf32] = (tmp_path / "synthetic" / "dwa" / "images.npz").read_bytes()
    figures[precision, form] = (summary["synthesis"]["delta_form"], summary["batches"][0])
  # recover.emulate_tf32 reached the convolutions:
  assert images["float32", True] != images["float32", False]
  assert figures["float32", "auto"][0] == "direct"
  assert figures["float32", "auto"][1]["delta_cosine"] == pytest.approx(1, abs=1e-6)
  assert figures["float32", "auto"][1]["delta_norm_ratio"] == pytest.approx(1, abs=1e-6)
  assert figures["bfloat16", "auto"][0] == "split"
  assert figures["bfloat16", "auto"][1]["delta_cosine"] >= 0.99
  assert abs(figures["bfloat16", "auto"][1]["delta_norm_ratio"] - 1) <= 0.01
  assert figures["bfloat16", "direct"][1]["delta_cosine"] < 0.9
  logged = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
            if r["stage"] == "recover/dwa"]
  assert {"delta_cosine", "delta_norm_ratio"} <= set(logged[-1])
  assert files.read_json(tmp_path / "synthetic" / "dwa" / "recover.json")["batches"][0][
      "delta_cosine"] == figures["bfloat16", "direct"][1]["delta_cosine"]
