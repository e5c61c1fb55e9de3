"""The three stages end to end on the embedded digits data, at toy sizes."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from dwa_jax import compat, presets, recover, relabel, squeeze, teacher_store, train_loop

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(methods=("sre2l", "dwa")):
  c = presets.cifar("digits", methods, model="convnet")
  c.ipc = 2
  c.teacher.epochs, c.teacher.batch_size, c.teacher.eval_every = 2, 128, 1
  c.recover.iterations, c.recover.adjust_steps, c.recover.jitter = 4, 2, 1
  c.recover.scalars_every = 2
  c.relabel.epochs, c.relabel.batch_size, c.relabel.eval_every = 3, 16, 1
  c.relabel.seeds = (0, 1)
  return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """One squeeze + recover run shared by the tests below."""
  path = tmp_path_factory.mktemp("run")
  config = tiny_config()
  config.stage = "recover"
  squeeze.run(presets.resolve(config), path)
  for m in config.methods:
    recover.run(presets.resolve(config), path, m)
  return path


def test_squeeze_saves_a_loadable_teacher(workdir):
  model, variables, meta = teacher_store.load_teacher(workdir)
  assert meta["num_classes"] == 10 and meta["image_shape"] == [8, 8, 1]
  assert 20 < meta["test_accuracy"] <= 100  # two epochs on digits: well above chance (10 %)
  assert set(variables) == {"params", "batch_stats"}


def test_recover_writes_lossless_images_png_folder_and_grid(workdir):
  out = workdir / "synthetic" / "dwa"
  with np.load(out / "images.npz") as f:
    images, labels = f["images"], f["labels"]
  assert images.shape == (20, 8, 8, 1) and images.dtype == np.float32
  assert images.min() >= 0 and images.max() <= 1
  np.testing.assert_array_equal(labels, np.tile(np.arange(10), 2))
  png = np.asarray(Image.open(out / "png" / "class003" / "class003_id001.png"))
  np.testing.assert_array_equal(png, np.rint(images[13, ..., 0] * 255).astype(np.uint8))
  assert len(list((out / "png").glob("class*/*.png"))) == 20
  assert Image.open(out / "grid.png").size[0] > 10 * 8
  summary = json.loads((out / "recover.json").read_text())
  assert summary["init"] == "real" and len(summary["batches"]) == 2
  assert all(0 < b["delta_norm"] <= 0.015 + 1e-6 for b in summary["batches"])
  sre2l = json.loads((workdir / "synthetic" / "sre2l" / "recover.json").read_text())
  assert sre2l["init"] == "noise" and sre2l["synthesis"]["r_var"] == 1.0
  assert all(b["delta_norm"] == 0 for b in sre2l["batches"])


def test_recover_is_deterministic(workdir, tmp_path):
  config = tiny_config(("dwa",))
  (tmp_path / "teacher").symlink_to(workdir / "teacher")
  recover.run(presets.resolve(config), tmp_path, "dwa")
  a = (workdir / "synthetic" / "dwa" / "images.npz").read_bytes()
  assert (tmp_path / "synthetic" / "dwa" / "images.npz").read_bytes() == a


def test_relabel_reports_final_best_and_spread(workdir):
  config = tiny_config()
  results = relabel.run(presets.resolve(config), workdir)
  assert set(results["sets"]) == {"sre2l", "dwa", relabel.RANDOM_REAL}
  for r in results["sets"].values():
    assert len(r["runs"]) == 2 and r["num_images"] == 20
    assert r["best_mean"] >= r["final_mean"] - 1e-9
    assert all(len(run["history"]) == 3 for run in r["runs"])
  every_device = {"devices": len(jax.devices()), "processes": 1}
  assert results["stages"] == {"squeeze": every_device, "recover": every_device,
                               "relabel": every_device}
  table = (workdir / "results.md").read_text()
  assert "| dwa | 2 | 2 |" in table and "±" in table


def tensorboard_scalars(logdir) -> dict:
  """tag -> [(step, value)] from tensorboardX event files (TFRecord framing: length, its CRC,
  an Event proto, its CRC)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars = {}
  for path in sorted(pathlib.Path(logdir).glob("events.out.tfevents.*")):
    blob = path.read_bytes()
    at = 0
    while at < len(blob):
      length = int.from_bytes(blob[at:at + 8], "little")
      event = event_pb2.Event.FromString(blob[at + 12:at + 12 + length])
      at += 16 + length
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_every_stage_writes_tensorboard_scalars(workdir):
  if not (workdir / "results.json").exists():  # this test alone: run relabel here
    relabel.run(presets.resolve(tiny_config()), workdir)
  scalars = tensorboard_scalars(workdir / "tensorboard")
  for tag in ("squeeze/train_loss", "squeeze/test_accuracy", "squeeze/learning_rate",
              "squeeze/images_per_second", "recover/dwa/final_ce", "recover/dwa/delta_norm",
              "recover/dwa/final_bn_loss", "recover/dwa/image_iterations_per_second",
              "relabel/relabel_dwa_seed_0/train_loss", "relabel/relabel_dwa_seed_0/test_accuracy",
              "relabel/relabel_dwa_seed_0/learning_rate"):
    assert tag in scalars, sorted(scalars)
  assert [s for s, _ in scalars["squeeze/train_loss"]] == [1, 2]
  # Per-iteration recover curves: iterations 0 and 2 of batch 0 (steps 0, 2) and batch 1 (4, 6).
  for name in ("ce", "bn_loss"):
    assert sorted(s for s, _ in scalars[f"recover/dwa/iteration/{name}"]) == [0, 2, 4, 6]
  assert scalars["squeeze/learning_rate"][0][1] == pytest.approx(0.1)  # epoch 1: the base lr


def test_kd_loss_is_batchmean_kl_with_optional_t2():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
  log_softmax = lambda z: z - np.log(np.exp(z).sum(1, keepdims=True))
  p_t = np.exp(log_softmax(t / 3))
  expected = np.sum(p_t * (np.log(p_t) - log_softmax(s / 3))) / 4
  np.testing.assert_allclose(relabel.kd_loss(s, t, 3.0, False), expected, rtol=1e-5)
  np.testing.assert_allclose(relabel.kd_loss(s, t, 3.0, True), 9 * expected, rtol=1e-5)


def run_main(*args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "dwa_jax.main", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=600)


def test_command_line_overrides_and_all_stages(tmp_path):
  proc = run_main("--config=configs/demo_digits.py", f"--workdir={tmp_path}",
                  "--config.ipc=1", "--config.methods=('dwa',)", "--config.teacher.epochs=1",
                  "--config.recover.iterations=2", "--config.recover.adjust_steps=1",
                  "--config.relabel.epochs=1", "--config.relabel.seeds=(0,)",
                  "--config.relabel.random_real_baseline=False")
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["ipc"] == 1 and saved["recover"]["iterations"] == 2
  assert saved["methods"] == ["dwa"]
  assert "| dwa | 1 | 1 |" in proc.stdout
  assert (tmp_path / "results.json").exists() and (tmp_path / "metrics.jsonl").exists()


# In the slow suite: tests/test_errors.py checks these messages (and the one-line form through
# the command line) in the default one.
@pytest.mark.slow
@pytest.mark.parametrize("override,message", [
    ("--config.ipc=0", "ipc must be >= 1"),
    ("--config.recover.r_bn=-1.0", "recover.r_bn must be >= 0"),
    ("--config.stage=distill", "stage must be one of"),
])
def test_bad_config_is_one_clear_error(tmp_path, override, message):
  proc = run_main("--config=configs/demo_digits.py", f"--workdir={tmp_path}", override)
  assert proc.returncode == 2
  assert message in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "teacher").exists()


def test_every_config_file_loads_and_validates():
  import importlib.util
  for path in sorted((REPO / "configs").glob("*.py")):
    if path.name == "__init__.py":  # the package marker (configs are installed as a package)
      continue
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    resolved = presets.resolve(module.get_config())  # raises for a config that cannot run
    compat.check_resolved(resolved)
    assert resolved.methods or resolved.stage == "squeeze", path.name


def test_student_step_trains_with_dropout_like_torch():
  """Students with dropout get a dropout PRNG in training (torch's model.train() behaviour)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  from dwa_jax.models.layers import dropout

  class DropoutNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = dropout(self, x.reshape(x.shape[0], -1), 0.5, train)
      return nn.Dense(3)(x)

  student, teacher = DropoutNet(), DropoutNet()
  x = jnp.ones((4, 2, 2, 1))
  variables = {**student.init(jax.random.key(0), x), "batch_stats": {}}
  teacher_vars = student.init(jax.random.key(1), x)
  rc = presets.demo_digits().relabel
  rc.augment, rc.mixing = "none", "none"
  state = train_loop.TrainState.create(apply_fn=student.apply, params=variables["params"],
                                       tx=optax.sgd(0.0), batch_stats={})
  prepare = relabel.student_input(rc, (teacher,), (0.0,), (1.0,), 3)
  loss = relabel.student_loss(rc)
  step = lambda key: train_loop.train_step(state, x, jnp.zeros(4, jnp.int32), key, (teacher_vars,),
                                           prepare=prepare, loss=loss)[1]
  t_logits = teacher.apply(teacher_vars, x)
  no_dropout = relabel.kd_loss(student.apply(variables, x, train=False), t_logits,
                               rc.temperature, rc.t2_factor)
  losses = [float(step(jax.random.key(k))) for k in range(3)]
  assert len(set(losses)) == 3 and all(abs(l - float(no_dropout)) > 1e-9 for l in losses)


def test_relabel_validates_a_set_in_the_authors_released_layout(workdir, tmp_path):
  """relabel.synthetic_set=folder:PATH with new{c:03d}/class{c:03d}_id{i:03d}.jpg (their class
  order), trained with the same recipe; the images are the decoded JPEG files."""
  with np.load(workdir / "synthetic" / "dwa" / "images.npz") as f:
    images, labels = f["images"], f["labels"]
  released = tmp_path / "released"
  for n, (image, c) in enumerate(zip(images, labels)):
    path = released / f"new{c:03d}" / f"class{c:03d}_id{n // 10:03d}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.rint(image[..., 0] * 255).astype(np.uint8)).save(path, quality=75)
  config = tiny_config()
  config.relabel.synthetic_set = f"folder:{released}"
  config.relabel.random_real_baseline = False
  config.relabel.seeds = (0,)
  found = relabel.open_synthetic_set(config.relabel.synthetic_set, (8, 8, 1), 10)
  assert found.class_names[:3] == ("new000", "new001", "new002")
  np.testing.assert_array_equal(found.labels, np.repeat(np.arange(10), 2))
  np.testing.assert_array_equal(found.images[3][..., 0],
                                np.asarray(Image.open(released / "new001" / "class001_id001.jpg")))
  results = relabel.run(presets.resolve(config), workdir)
  assert list(results["sets"]) == [f"folder:{released}"]
  assert results["sets"][f"folder:{released}"]["num_images"] == 20
  with pytest.raises(ValueError, match=r"images of shape \(8, 8, 3\), but the teacher takes "
                     r"\(32, 32, 3\)"):
    relabel.open_synthetic_set(f"folder:{released}", (32, 32, 3), 10)
