"""DWA's Δθ under accelerator arithmetic, emulated on the CPU: bfloat16 (TPU default, and
recover.precision='bfloat16') and TF32 (Ampere+ GPU default) read weights with 7 and 10 mantissa
bits, which rounds a direct θ + Δθ into noise; the split form layer(x; θ) + layer(x; Δθ) keeps
Δθ. Also: the split form is the same maths, and the recover stage picks the form per backend."""

import functools

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


def test_emulated_rounding_passes_the_gradient_straight_through():
  """`read_as` rounds forward and passes the cotangent unchanged (the bare bit rounding has a
  zero gradient, so an emulation built on it would never move a pixel); `cotangent_read_as`
  passes forward unchanged and rounds the cotangent."""
  a = jnp.ones(4) * 1.3
  grad = jax.grad(lambda a: jnp.sum(arithmetic.read_as(a, 10) ** 2))(a)
  np.testing.assert_array_equal(grad, 2 * arithmetic.round_mantissa(a, 10))
  assert float(jnp.abs(grad - 2 * a).max()) > 0  # the forward value was rounded
  c = jax.random.normal(jax.random.key(0), (4,))
  np.testing.assert_array_equal(arithmetic.cotangent_read_as(a, 7), a)
  grad = jax.grad(lambda a: jnp.vdot(arithmetic.cotangent_read_as(a, 7), c))(a)
  np.testing.assert_array_equal(grad, arithmetic.round_mantissa(c, 7))


@pytest.mark.parametrize("bits,form", [(10, "direct"), (10, "split"), (7, "direct"), (7, "split")])
def test_synthesis_under_emulated_arithmetic_moves_the_pixels(bits, form):
  """A DWA synthesis (tiny ConvNet, 30 iterations, K = 2) under emulated TF32 and bfloat16
  moves the pixels as far as the exact one (within 10 %), and ends elsewhere by a bounded
  amount: measured 0.16-0.18 (TF32) and 0.26 (bfloat16) of the distance moved, which Adam's
  sign-like steps make larger than the rounding itself."""
  model, variables, x0, paths, _ = convnet_case((10, 16, 16, 3))
  out = {}
  for name, cfg in (("exact", synthesis.SynthesisConfig(iterations=30, adjust_steps=2)),
                    ("emulated", synthesis.SynthesisConfig(iterations=30, adjust_steps=2,
                                                           emulate_bits=bits, delta_form=form))):
    draws = synthesis.draw_augmentation(jax.random.key(2), cfg.iterations, cfg, (16, 16))
    run = jax.jit(functools.partial(synthesis.synthesize_batch, model, bn_paths=paths,
                                    pixel_mean=(0.5,) * 3, pixel_std=(0.25,) * 3, cfg=cfg))
    out[name] = np.asarray(run(variables, x0, jnp.arange(10), jax.random.key(3), draws)[0])
  moved = np.linalg.norm(out["exact"] - np.asarray(x0))
  assert moved > 1.0
  assert np.linalg.norm(out["emulated"] - np.asarray(x0)) / moved == pytest.approx(1, abs=0.1)
  assert 0 < np.linalg.norm(out["emulated"] - out["exact"]) / moved < 0.5


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


def test_a_whole_synthesis_in_the_split_form_is_the_direct_one_in_float64():
  """The split form through everything a DWA batch runs: the K-step ascent, quirk Q1's leaked
  image gradient, quirk Q2's chain (a previous chunk's Δθ and weight gradients) and T Adam
  steps. In float64 the images and Δθ agree with the direct form to ~1e-10 (a stop_gradient on
  the split branch, or a Δθ left out of it, changes them at the first step)."""
  model, variables, x0, paths, _ = convnet_case((10, 16, 16, 3))
  with jax.enable_x64(True):
    v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    x64 = jnp.asarray(x0, jnp.float64)
    chain = synthesis.ChainCarry(random_delta(v64["params"], seed=11),
                                 random_delta(v64["params"], rho=1.0, seed=12))
    out = {}
    for form in synthesis.DELTA_FORMS:
      cfg = synthesis.SynthesisConfig(iterations=8, adjust_steps=3, compat_q1=True,
                                      compat_q2=True, delta_form=form)
      draws = synthesis.draw_augmentation(jax.random.key(2), cfg.iterations, cfg, (16, 16))

      @jax.jit
      def run(v, x, chain, draws, cfg=cfg):
        state, _ = synthesis.start_batch(model, v, x, jnp.arange(10), jax.random.key(3), draws,
                                         bn_paths=paths, cfg=cfg, chain=chain)
        state, metrics = synthesis.run_iterations(
            model, v, state, jnp.arange(10), jax.random.key(3), draws, cfg.iterations,
            bn_paths=paths, pixel_mean=(0.5,) * 3, pixel_std=(0.25,) * 3, cfg=cfg)
        return state.x, state.delta, state.weight_grad_sum, metrics["ce"]

      out[form] = run(v64, x64, chain, draws)
  moved = float(jnp.abs(out["direct"][0] - x64).max())
  assert moved > 0.1
  np.testing.assert_allclose(out["split"][0], out["direct"][0], rtol=0, atol=1e-10 * moved)
  np.testing.assert_allclose(out["split"][3], out["direct"][3], rtol=1e-10)
  for tree in (1, 2):  # Δθ, and Q2's weight gradients handed to the next chunk
    for a, b in zip(jax.tree.leaves(out["split"][tree]), jax.tree.leaves(out["direct"][tree])):
      scale = float(jnp.abs(b).max()) + 1e-300
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-10 * scale)


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


def test_bfloat16_reads_bfloat16_and_sums_the_split_branches_in_float32():
  """Under precision=bfloat16 every convolution and matmul reads bfloat16 operands and returns
  float32 sums (a matrix unit's accumulation), so the Δθ branch of the split form is added to
  the θ branch in float32 and BatchNorm sees float32: summed in bfloat16, Δθ's effect (about
  1e-4 of an activation) would fall below its rounding step."""
  model, variables, x, paths, delta = convnet_case()
  jaxpr = jax.make_jaxpr(lambda v, d, x: synthesis.forward_with_bn_stats(
      model, v["params"], v["batch_stats"], x, paths, "bfloat16", d, "split"))(variables, delta, x)
  products = [e for e in jaxpr.eqns if e.primitive.name in ("conv_general_dilated", "dot_general")]
  assert len(products) == 8  # 3 convolutions and the classifier, on θ and on Δθ
  for e in products:
    assert all(v.aval.dtype == jnp.bfloat16 for v in e.invars)
    assert e.outvars[0].aval.dtype == jnp.float32


def test_the_recover_stage_runs_the_direct_form_unless_asked():
  """recover.delta_form='auto' is direct on every platform, whatever its arithmetic (students
  score DWA synthesised direct under TF32 and bfloat16 as exact DWA: RESULTS.md); 'split' is
  honoured where asked, and the weight bits record the platform's arithmetic."""
  rc = presets.resolve(presets.base_config()).recover
  for platform, bits in (("cpu", None), ("tpu", 7), ("gpu", 10)):
    cfg = recover.synthesis_config(rc, "dwa", platform)
    assert (cfg.delta_form, cfg.weight_bits) == ("direct", bits)
  rc.precision = "bfloat16"
  cfg = recover.synthesis_config(rc, "dwa", "cpu")
  assert (cfg.delta_form, cfg.weight_bits) == ("direct", 7)
  rc.precision = "float32"
  for emulate, bits in (("tf32", 10), ("bfloat16", 7)):
    rc.emulate = emulate
    cfg = recover.synthesis_config(rc, "dwa", "cpu")  # emulated on the CPU: direct, rounded
    assert (cfg.delta_form, cfg.weight_bits, cfg.emulate_bits) == ("direct", bits, bits)
  rc.emulate, rc.delta_form = "none", "split"
  assert recover.synthesis_config(rc, "dwa", "gpu").delta_form == "split"


def test_gpus_without_tf32_read_float32_exactly():
  """V100 (7.0) and T4 (7.5) have no TF32: float32 is read exactly there; A100 (8.0), H100 (9.0)
  round to TF32; an unknown capability is taken as TF32."""
  bits = lambda cc: arithmetic.matmul_input_bits("gpu", None, cc)
  assert (bits("7.0"), bits("7.5"), bits("8.0"), bits("9.0"), bits("10.0"), bits(None),
          bits("gfx90a")) == (None, None, 10, 10, 10, 10, 10)
  assert arithmetic.matmul_input_bits("gpu", "bfloat16", "7.0") == 7


def test_recover_records_how_much_of_delta_survived(tmp_path):
  """recover.json's batches (and metrics.jsonl, hence TensorBoard) carry the Δθ-survival figure
  of the arithmetic that ran: exact on the CPU in float32; with bfloat16 convolutions, kept by
  the split form, and blurred by the direct form that `auto` runs (measured on the digits
  teacher: cosine 0.99999 against 0.51)."""
  import json  # pylint: disable=g-import-not-at-top
  from dwa_jax import files, squeeze  # pylint: disable=g-import-not-at-top
  from dwa_jax.testing import tiny_config as tiny  # pylint: disable=g-import-not-at-top
  config = tiny()
  config.stage = "squeeze"
  squeeze.run(presets.resolve(config), tmp_path)
  figures, images = {}, {}
  for precision, form, emulate in (("float32", "auto", "tf32"), ("float32", "auto", "none"),
                                   ("bfloat16", "auto", "none"), ("bfloat16", "split", "none")):
    config.recover.precision, config.recover.delta_form = precision, form
    config.recover.emulate = emulate
    summary = recover.run(presets.resolve(config), tmp_path, "dwa")
    images[precision, emulate] = (tmp_path / "synthetic" / "dwa" / "images.npz").read_bytes()
    figures[precision, form] = (summary["synthesis"]["delta_form"], summary["batches"][0])
  # recover.emulate reached the convolutions:
  assert images["float32", "tf32"] != images["float32", "none"]
  assert figures["float32", "auto"][0] == "direct"
  assert figures["float32", "auto"][1]["delta_cosine"] == pytest.approx(1, abs=1e-6)
  assert figures["float32", "auto"][1]["delta_norm_ratio"] == pytest.approx(1, abs=1e-6)
  assert figures["bfloat16", "split"][0] == "split"
  assert figures["bfloat16", "split"][1]["delta_cosine"] >= 0.99
  assert abs(figures["bfloat16", "split"][1]["delta_norm_ratio"] - 1) <= 0.01
  assert figures["bfloat16", "auto"][0] == "direct"
  assert figures["bfloat16", "auto"][1]["delta_cosine"] < 0.9
  logged = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
            if r["stage"] == "recover/dwa"]
  assert {"delta_cosine", "delta_norm_ratio"} <= set(logged[-1])
  assert files.read_json(tmp_path / "synthetic" / "dwa" / "recover.json")["batches"][0][
      "delta_cosine"] == figures["bfloat16", "split"][1]["delta_cosine"]
