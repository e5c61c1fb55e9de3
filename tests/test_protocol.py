"""The evaluation-protocol controls of relabel: each does what its config
field says, the defaults keep the official recipe, and every run writes its protocol card."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dwa_jax import main as main_lib
from dwa_jax import augment, presets, relabel, train_lib, train_loop
from dwa_jax.models import build_model

from dwa_jax.testing import tiny_config as tiny


def test_learning_rate_floor():
  lr = lambda epoch, floor: float(train_lib.warmup_cosine(0.1, 10, 0, epoch, floor))
  assert lr(0, 0.5) == pytest.approx(0.1)
  assert lr(10, 0.5) == pytest.approx(0.05)  # the end of the cosine: floor x lr
  assert lr(5, 0.5) == pytest.approx(0.075)
  assert lr(10, 0.0) == pytest.approx(0.0, abs=1e-9)
  assert lr(5, 0.0) == pytest.approx(0.05)


def test_losses():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
  labels = np.array([0, 3, 1, 4])
  one_hot = np.eye(5)[labels]
  ce = optax.softmax_cross_entropy_with_integer_labels(s, labels).mean()
  np.testing.assert_allclose(relabel.soft_cross_entropy(s, one_hot), ce, rtol=1e-6)
  np.testing.assert_allclose(relabel.mse_ce_loss(s, t, one_hot, 0.025),
                             np.mean((s - t) ** 2) + 0.025 * ce, rtol=1e-6)


def batch_targets(**fields):
  """prepare() of a relabel recipe on a tiny batch with two different random teachers."""
  rc = presets.demo_digits().relabel
  for k, v in fields.items():
    rc[k] = v
  teacher = build_model("convnet", 10)
  x = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
  variables = tuple(teacher.init(jax.random.key(k), x[:1].astype(np.float32)) for k in (1, 2))
  labels = jnp.array([0, 1, 2, 3, 4, 5])
  prepare = relabel.student_input(rc, (teacher, teacher), (0.5,), (0.25,), 10)
  inputs, target = prepare(jax.random.key(0), x, labels, variables)
  logits = [teacher.apply(v, inputs, train=False) for v in variables]
  return inputs, target, logits, labels


def test_ensemble_averages_the_teachers_logits():
  _, target, logits, _ = batch_targets(mixing="none")
  assert float(jnp.abs(logits[0] - logits[1]).max()) > 1e-3
  np.testing.assert_allclose(target["teacher"], (logits[0] + logits[1]) / 2, rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("mixing", ["none", "mixup", "cutmix"])
def test_hard_labels_are_mixed_as_the_images(mixing):
  """The hard target is λ·onehot(y) + (1 − λ)·onehot(y[perm]) with the λ and permutation that
  mixed the images: drawn again here from prepare's key, and checked to give prepare's images."""
  inputs, target, _, labels = batch_targets(mixing=mixing, labels="hard")
  assert set(target) == {"hard"}  # no teacher
  hard = np.asarray(target["hard"])
  one_hot = np.eye(10)[labels]
  if mixing == "none":
    np.testing.assert_array_equal(hard, one_hot)
    return
  rc = presets.demo_digits().relabel
  x = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
  aug_key, mix_key = jax.random.split(jax.random.key(0))
  views = train_lib.augment_views(aug_key, train_lib.normalize(x, (0.5,), (0.25,)), rc.augment)
  mixed, perm, lam = getattr(augment, mixing)(mix_key, views, rc.mix_alpha)
  np.testing.assert_allclose(inputs, mixed, rtol=1e-6, atol=1e-6)  # the draws prepare used
  lam, perm = float(lam), np.asarray(perm)
  assert 0 < lam < 1 and np.any(perm != np.arange(6))
  np.testing.assert_allclose(hard, lam * one_hot + (1 - lam) * one_hot[perm], rtol=1e-6,
                             atol=1e-7)
  assert np.any(hard.max(1) < 1)  # not one-hot


def test_ema_is_updated_each_step_and_evaluated():
  model = build_model("convnet", 10)
  tx = optax.sgd(0.1)
  state = train_loop.create_state(model, jax.random.key(0), (8, 8, 1), tx, ema=True)
  start = jax.tree.map(np.copy, state.variables)
  x = jnp.asarray(np.random.default_rng(0).random((4, 8, 8, 1)), jnp.float32)
  prepare = lambda key, images, labels, aux: (images, labels)
  loss = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  new, _ = train_loop.train_step(state, x, jnp.arange(4), jax.random.key(1), None,
                                 prepare=prepare, loss=loss, ema_decay=0.9)
  expected = jax.tree.map(lambda a, b: 0.9 * a + 0.1 * b, start, new.variables)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), new.ema,
               expected)
  assert new.evaluated_variables is new.ema
  plain = train_loop.create_state(model, jax.random.key(0), (8, 8, 1), tx)
  assert not hasattr(plain, "ema") and plain.evaluated_variables == plain.variables


def test_protocol_fields_are_validated():
  c = tiny()
  c.relabel.labels, c.relabel.loss, c.relabel.headline = "soft", "l1", "mean"
  c.relabel.ema_decay, c.relabel.teacher_ensemble = 1.0, ("",)
  with pytest.raises(ValueError) as e:
    presets.resolve(c)
  for field in ("labels", "loss", "headline", "ema_decay", "teacher_ensemble"):
    assert f"relabel.{field}" in str(e.value)
  c = tiny()
  c.relabel.lr_floor = 2.0
  with pytest.raises(ValueError, match="relabel.lr_floor must be in"):
    presets.resolve(c)


@pytest.fixture(scope="module")
def two_teachers(finished, tiny_teacher_seed1, tmp_path_factory):
  """A finished tiny run and a second teacher (another seed) in its own workdir."""
  other = tmp_path_factory.mktemp("protocol_teacher2") / "run"
  shutil.copytree(tiny_teacher_seed1, other)
  return finished, other


def relabel_again(run, tmp_path, **fields):
  workdir = tmp_path / "w"
  shutil.copytree(run, workdir)
  c = tiny()
  c.stage = "relabel"
  c.relabel.random_real_baseline = True
  for k, v in fields.items():
    c.relabel[k] = v
  assert main_lib.execute(c, workdir) == 0
  return json.loads((workdir / "results.json").read_text()), (workdir / "results.md").read_text()


def test_a_run_writes_its_protocol_card(two_teachers, tmp_path):
  run, other = two_teachers
  results, markdown = relabel_again(run, tmp_path, teacher_ensemble=(str(other),), loss="mse_ce",
                                    ema_decay=0.5, lr_floor=0.5, headline="final")
  card = results["protocol"]
  assert [t["workdir"] for t in card["teachers"]] == [".", str(other)]
  assert card["loss"] == "MSE(logits) + 0.025 x CE" and card["ema_decay"] == 0.5
  assert card["lr_floor"] == 0.5 and card["headline"] == "final"
  assert card["teacher_mode"] == "eval" and card["seeds"] == [0]
  assert card["random_real_seed"] == 1 and card["evaluated_after_epochs"] == [1]
  for name, r in results["sets"].items():
    assert r["headline_mean"] == r["final_mean"], name
  assert "| loss | MSE(logits) + 0.025 x CE |" in markdown and "| ema_decay | 0.5 |" in markdown


def test_hard_labels_need_no_teacher_weights(two_teachers, tmp_path):
  """labels=hard trains on the sets' own labels: the card says so, and the result does not
  depend on the teacher's weights (here: the teacher's weights are replaced by another's)."""
  run, other = two_teachers
  first, markdown = relabel_again(run, tmp_path, labels="hard")
  assert first["protocol"]["labels"] == "hard labels (no teacher)"
  assert first["protocol"]["teachers"] == [] and first["protocol"]["teacher_mode"] is None
  assert "| labels | hard labels (no teacher) |" in markdown
  swapped = tmp_path / "swapped"
  shutil.copytree(run, swapped)
  shutil.rmtree(swapped / "teacher" / "variables")
  shutil.copytree(other / "teacher" / "variables", swapped / "teacher" / "variables")
  c = tiny()
  c.stage, c.relabel.labels, c.relabel.random_real_baseline = "relabel", "hard", True
  assert main_lib.execute(c, swapped) == 0
  second = json.loads((swapped / "results.json").read_text())
  for name in first["sets"]:
    assert first["sets"][name]["final_mean"] == second["sets"][name]["final_mean"], name
