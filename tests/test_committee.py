"""A committee of teachers in synthesis (recover.committee; synthesis.stack_teachers)."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwa_jax import data, device_dispatch, presets, recover, synthesis
from dwa_jax import main as main_lib
from dwa_jax.models import build_model

from dwa_jax.testing import tiny_config as tiny

MEAN, STD = (0.5,), (0.25,)
SHAPE = (8, 8, 1)


def teacher(seed):
  model = build_model("convnet", 10)
  variables = model.init(jax.random.key(seed), np.zeros((1, *SHAPE), np.float32))
  # Non-trivial running statistics, so BN matching has something to match.
  stats = jax.tree.map(lambda a: a + 0.1 * seed, variables["batch_stats"])
  return model, {"params": variables["params"], "batch_stats": stats}


@pytest.fixture(scope="module")
def batch():
  digits = data.load_dataset("digits", "train")
  x = recover.initial_batches(digits, 1, 0, "real", MEAN, STD)[0]
  return jnp.asarray(x), jnp.arange(10)


def synthesize(model, variables, batch, cfg):
  x, labels = batch
  draws = synthesis.draw_augmentation(jax.random.key(5), cfg.iterations, cfg, SHAPE[:2])
  runner = device_dispatch.GroupRunner(model, variables, SHAPE, MEAN, STD, cfg)
  return runner.synthesize(x, labels, jax.random.key(1), draws)


CFG = synthesis.SynthesisConfig(iterations=6, adjust_steps=3, rho=0.1, jitter=1)


@pytest.mark.parametrize("method", ["dwa", "sre2l"])
def test_a_committee_of_one_teacher_twice_is_that_teacher(batch, method):
  model, v = teacher(0)
  cfg = dataclasses.replace(CFG, method=method)
  alone, m1 = synthesize(model, v, batch, cfg)
  twice, m2 = synthesize(model, synthesis.stack_teachers([v, v]),
                         batch, dataclasses.replace(cfg, committee=2))
  np.testing.assert_allclose(twice, alone, atol=1e-5)
  np.testing.assert_allclose(m2["ce"], m1["ce"], rtol=1e-5)
  np.testing.assert_allclose(m2["delta_norm"], m1["delta_norm"], rtol=1e-5)


def test_the_committee_loss_is_the_mean_and_each_teacher_has_its_own_delta(batch):
  model, a = teacher(0)
  _, b = teacher(1)
  x, labels = batch
  cfg = dataclasses.replace(CFG, committee=2)
  stacked = synthesis.stack_teachers([a, b])
  paths = synthesis.bn_layer_paths(model, a, SHAPE)
  w = synthesis.bn_layer_weights(len(paths), CFG.first_bn_weight)
  # Compiled, not run op by op: the same maths, in seconds rather than a minute.
  loss_fn = jax.jit(synthesis.synthesis_loss, static_argnums=(0, 5, 7))
  start = jax.jit(synthesis.start_batch, static_argnums=(0,), static_argnames=("bn_paths", "cfg"))
  single = [loss_fn(model, v["params"], v["batch_stats"], x, labels, paths, w, CFG)
            for v in (a, b)]
  loss, (ce, terms) = loss_fn(model, stacked["params"], stacked["batch_stats"], x, labels, paths,
                              w, cfg)
  np.testing.assert_allclose(loss, (single[0][0] + single[1][0]) / 2, rtol=1e-5)
  np.testing.assert_allclose(terms, (single[0][1][1] + single[1][1][1]) / 2, rtol=1e-5)
  assert abs(float(single[0][0] - single[1][0])) > 1e-3  # two different teachers

  draws = synthesis.draw_augmentation(jax.random.key(5), CFG.iterations, CFG, SHAPE[:2])
  state, metrics = start(model, stacked, x, labels, jax.random.key(1), draws, bn_paths=paths,
                         cfg=cfg)
  norms = []
  for k, v in enumerate((a, b)):
    own, own_metrics = start(model, v, x, labels, jax.random.key(1), draws, bn_paths=paths,
                             cfg=CFG)
    for got, want in zip(jax.tree.leaves(state.delta), jax.tree.leaves(own.delta)):
      np.testing.assert_allclose(got[k], want, atol=1e-6)
    norms.append(float(own_metrics["delta_norm"]))
  assert abs(norms[0] - norms[1]) > 1e-4  # two different ascents ...
  np.testing.assert_allclose(metrics["delta_norm"], np.mean(norms), rtol=1e-5)  # ... averaged


def test_teachers_of_another_architecture_and_quirks_are_refused():
  _, a = teacher(0)
  wrong = jax.tree.map(lambda x: x[..., :1] if x.ndim else x, a)
  with pytest.raises(ValueError, match="does not have the first teacher's architecture"):
    synthesis.stack_teachers([a, wrong])
  with pytest.raises(ValueError, match="Q1/Q2 are single-teacher"):
    synthesis.SynthesisConfig(committee=2, compat_q1=True)
  synthesis.SynthesisConfig(method="sre2l", committee=2, compat_q1=True)  # Q1 is DWA's


@pytest.fixture(scope="module")
def two_teachers(finished, tiny_teacher_seed1, tmp_path_factory):
  """A finished tiny run (its teacher the committee's first) and a second teacher."""
  other = tmp_path_factory.mktemp("committee_teacher2") / "run"
  shutil.copytree(tiny_teacher_seed1, other)
  return finished, other


def test_a_committee_run_is_validated_and_recorded(two_teachers, tmp_path):
  run, other = two_teachers
  c = tiny()
  c.recover.committee = ("",)
  with pytest.raises(ValueError, match="recover.committee must be squeeze workdirs"):
    presets.resolve(c)
  c.recover.committee, c.compat = (str(other),), "official"
  with pytest.raises(ValueError, match="recover.compat_q1"):
    presets.resolve(c)
  c.compat, c.stage = "clean", "recover"
  workdir = tmp_path / "w"
  shutil.copytree(run, workdir)
  assert main_lib.execute(c, workdir) == 0
  summary = json.loads((workdir / "synthetic" / "dwa" / "recover.json").read_text())
  assert summary["synthesis"]["committee"] == 2
  assert [t["workdir"] for t in summary["teacher"]["committee"]] == [".", str(other)]
  for b in summary["batches"]:
    assert abs(b["delta_norm"] - c.recover.rho) < 1e-3 * c.recover.rho


def test_a_committee_member_with_other_normalisation_is_refused(two_teachers, tmp_path):
  run, other = two_teachers
  odd = tmp_path / "odd"
  shutil.copytree(other, odd)
  meta_file = odd / "teacher" / "teacher.json"
  meta = json.loads(meta_file.read_text())
  meta["std"] = [s * 2 for s in meta["std"]]
  meta_file.write_text(json.dumps(meta))
  c = tiny()
  c.stage, c.recover.committee = "recover", (str(odd),)
  workdir = tmp_path / "w"
  shutil.copytree(run, workdir)
  assert main_lib.execute(c, workdir) == 2
