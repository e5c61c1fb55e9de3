"""The `compat` switch and each quirk of the authors' pipeline (dwa_jax/compat.py)."""

import dataclasses
import io
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dwa_jax import progress as progress_lib
from dwa_jax import device_dispatch
from dwa_jax import compat, data, presets, recover, train_loop

REPO = pathlib.Path(__file__).resolve().parents[1]
SWITCH_NAMES = ["compat_cifar10_std", "recover.compat_q1", "recover.compat_q2",
                "recover.compat_jpeg", "relabel.teacher_train_mode", "relabel.compat_eval_epochs"]


def test_clean_default_turns_every_quirk_off():
  settings = compat.settings(presets.resolve(presets.cifar("cifar10")))
  assert settings == {"compat": "clean", **{name: False for name in SWITCH_NAMES}}


@pytest.mark.parametrize("dataset,train_mode", [
    ("cifar10", True), ("cifar10_jpeg:x.npz", True), ("cifar100", True), ("digits", True),
    ("tiny_imagenet", False), ("imagenet2012", False)])
def test_official_turns_on_what_the_authors_script_for_the_dataset_does(dataset, train_mode):
  c = presets.cifar(dataset)
  c.compat = "official"
  settings = compat.settings(compat.resolve(c))
  # Their CIFAR validation labels with the teacher in train mode; Tiny/ImageNet in eval mode.
  assert settings.pop("relabel.teacher_train_mode") is train_mode
  assert settings == {"compat": "official", **{n: True for n in SWITCH_NAMES
                                                if n != "relabel.teacher_train_mode"}}


def test_a_switch_set_explicitly_wins_over_compat():
  c = presets.cifar("cifar10")
  c.compat = "official"
  c.recover.compat_q1 = False
  c.relabel.teacher_train_mode = False
  resolved = compat.resolve(c)
  assert resolved.recover.compat_q1 is False and resolved.relabel.teacher_train_mode is False
  assert resolved.recover.compat_jpeg is True
  c = presets.cifar("cifar10")
  c.recover.compat_jpeg = True  # one quirk alone on the clean default
  resolved = compat.resolve(c)
  assert [n for n, v in compat.settings(resolved).items() if v is True] == ["recover.compat_jpeg"]
  assert compat.settings(compat.resolve(resolved)) == compat.settings(resolved)  # idempotent
  with pytest.raises(TypeError, match="not resolved"):  # the stages never resolve one themselves
    compat.settings(c)


def test_unknown_compat_mode_is_rejected():
  c = presets.cifar("cifar10")
  c.compat = "authors"
  with pytest.raises(ValueError, match="compat must be one of"):
    presets.resolve(c)
  with pytest.raises(ValueError, match="compat must be one of"):
    compat.resolve(c)


def test_official_std_applies_to_cifar10_only():
  meta10 = dict(zip(("mean", "std"), data.NORMALISATION["cifar10"]))
  meta100 = dict(zip(("mean", "std"), data.NORMALISATION["cifar100"]))
  for dataset in ("cifar10", "cifar10_jpeg:/data/c.npz"):
    c = presets.cifar(dataset)
    assert compat.pixel_normalisation(compat.resolve(c), meta10) == data.NORMALISATION["cifar10"]
    c.compat_cifar10_std = True
    assert compat.pixel_normalisation(compat.resolve(c), meta10) == (meta10["mean"], (0.2023, 0.1994, 0.2010))
  c = presets.cifar("cifar100")
  c.compat = "official"
  assert compat.pixel_normalisation(compat.resolve(c), meta100) == data.NORMALISATION["cifar100"]


def test_eval_epochs_clean_and_official():
  assert sorted(train_loop.eval_epochs(40, 10, False)) == [10, 20, 30, 40]
  # The authors test when the 0-based epoch % 10 == 0, and after the last epoch.
  assert sorted(train_loop.eval_epochs(40, 10, True)) == [1, 11, 21, 31, 40]
  assert len(train_loop.eval_epochs(400, 10, True)) == 41


def test_official_jpeg_truncates_then_saves_quality_75():
  rng = np.random.default_rng(0)
  image = rng.uniform(0, 1, (32, 32, 3)).astype(np.float32)
  image[0, 0] = 0.9999  # truncation gives 254, rounding would give 255
  blob = compat.official_jpeg_bytes(image)
  expected = io.BytesIO()
  Image.fromarray((image * 255).astype(np.uint8)).save(expected, format="JPEG", quality=75)
  assert blob == expected.getvalue()
  decoded = compat.decode_jpeg(blob, 3)
  assert decoded.shape == (32, 32, 3) and decoded.dtype == np.uint8
  assert 25 < np.mean(np.abs(decoded.astype(float) - image * 255)) < 60  # lossy: noise is hit hard


def test_official_pipeline_from_the_command_line(tmp_path):
  """`--config.compat=official` end to end on digits: outputs in the authors' JPEG layout,
  students on the decoded JPEGs, the resolved switches recorded beside the results."""
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "dwa_jax.main", f"--config={REPO / 'configs' / 'demo_digits.py'}",
         f"--workdir={workdir}", "--config.compat=official", "--config.methods=('dwa',)",
         "--config.relabel.compat_eval_epochs=False", "--config.ipc=2",
         "--config.teacher.epochs=1", "--config.recover.iterations=3",
         "--config.recover.adjust_steps=2", "--config.relabel.epochs=3",
         "--config.relabel.eval_every=2", "--config.relabel.seeds=(0,)",
         "--config.relabel.random_real_baseline=False"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = workdir / "synthetic" / "dwa"
  jpgs = sorted(p.relative_to(out).as_posix() for p in (out / "jpg").rglob("*.jpg"))
  assert len(jpgs) == 20 and "jpg/new003/class003_id001.jpg" in jpgs
  assert not (out / "png").exists()
  with np.load(out / "images.npz") as f:
    images, labels = f["images"], f["labels"]
  # images.npz holds what the students train on: the decoded JPEGs.
  decoded = compat.decode_jpeg((out / "jpg/new003/class003_id001.jpg").read_bytes(), 1)
  np.testing.assert_array_equal(np.rint(images[13] * 255), decoded)
  assert labels[13] == 3
  with np.load(out / "images_lossless.npz") as f:
    lossless = f["images"]
  assert not np.array_equal(lossless, images) and np.abs(lossless - images).max() < 0.5
  np.testing.assert_allclose(images, compat.jpeg_roundtrip(lossless), rtol=0, atol=1e-7)
  summary = json.loads((out / "recover.json").read_text())
  assert summary["format"] == "jpeg_q75" and summary["synthesis"]["compat_q1"] is True
  # Q2 is on but one class chunk holds every class: recorded once, as not run, with why; the
  # CIFAR-10 std switch does nothing on digits.
  assert summary["synthesis"]["compat_q2"] is False
  assert "recover.compat_q2" not in summary["compat"]
  assert "one class chunk" in summary["compat"]["no_effect"]["recover.compat_q2"]
  assert summary["compat"]["compat_cifar10_std"] is False
  assert "CIFAR-10 only" in summary["compat"]["no_effect"]["compat_cifar10_std"]
  assert summary["compat"]["recover.compat_jpeg"] is True
  assert set(summary["pixel_statistics"]) == {"lossless", "jpeg"}
  manifest = json.loads((out / "manifest.json").read_text())["files"]
  assert "jpg/new003/class003_id001.jpg" in manifest and "images_lossless.npz" in manifest
  results = json.loads((workdir / "results.json").read_text())
  assert results["compat"]["compat"] == "official"
  assert results["compat"]["relabel.teacher_train_mode"] is True
  assert results["compat"]["relabel.compat_eval_epochs"] is False  # the explicit flag won
  assert [e for e, _ in results["sets"]["dwa"]["runs"][0]["history"]] == [2, 3]
  config = json.loads((workdir / "config.json").read_text())
  assert config["compat"] == "official" and config["recover"]["compat_q1"] is True


# ----------------------------------------------------------------------------- quirk Q2

def test_chained_groups_keep_chunk_order_per_ipc_index():
  todo = [(i, j) for i in range(3) for j in range(2)]
  assert device_dispatch.batch_groups(todo, 2, False) == [todo[0:2], todo[2:4], todo[4:6]]
  assert device_dispatch.batch_groups(todo, 2, True) == [[(0, 0), (1, 0)], [(0, 1), (1, 1)],
                                                 [(2, 0)], [(2, 1)]]
  # A resumed run: ipc 0 has only its second chunk left.
  assert device_dispatch.batch_groups([(0, 1), (1, 0), (1, 1)], 2, True) == [[(0, 1), (1, 0)],
                                                                      [(1, 1)]]


@pytest.fixture(scope="module")
def tiny_teacher():
  from dwa_jax.models.convnet import ConvNet  # pylint: disable=g-import-not-at-top
  model = ConvNet(10, width=8, depth=2)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  stats = jax.tree.map(lambda v: v + 0.2, variables["batch_stats"])
  return model, {"params": variables["params"], "batch_stats": stats}


def q2_config():
  c = presets.cifar("digits", ("dwa",), model="convnet")
  c.ipc = 2
  c.recover.iterations, c.recover.adjust_steps, c.recover.jitter = 3, 2, 1
  c.recover.classes_per_batch = 5
  c.recover.compat_q2 = True
  c.recover.checkpoint_every, c.recover.checkpoint_every_s = 2, 0.0
  return presets.resolve(c)


def chained_reference(model, variables, train, config, meta, chain=True):
  """Chunk by chunk with the library synthesizer, each chunk's carry passed to the next
  (chain=False: every chunk from the teacher as loaded, as without Q2)."""
  cfg = recover.synthesis_config(config.recover, "dwa")
  cfg = cfg if chain else dataclasses.replace(cfg, compat_q2=False)
  runner = device_dispatch.GroupRunner(model, variables, (8, 8, 1), meta["mean"], meta["std"], cfg)
  starts = recover.initial_batches(train, config.ipc, config.seed, "real", meta["mean"],
                                   meta["std"])
  chunks = recover.class_chunks(10, 5)
  out = {}
  for i in range(config.ipc):
    chain = None
    for j, classes in enumerate(chunks):
      key = jax.random.split(recover.batch_key(config.seed, i, j))[1]
      draws = recover.batch_draws(config.seed, i, j, cfg, (8, 8))
      x, metrics = runner.synthesize(starts[i, classes], classes, key, draws, chain)
      chain = metrics.get("chain")
      out[i, j] = (np.asarray(x), float(metrics["delta_norm"]))
  return out


def test_q2_chain_through_the_stage_matches_the_library_and_resumes(tiny_teacher, tmp_path,
                                                                    monkeypatch):
  model, variables = tiny_teacher
  train = data.load_dataset("digits", "train")
  meta = {"mean": list(train.mean), "std": list(train.std), "image_shape": [8, 8, 1]}
  config = q2_config()
  reference = chained_reference(model, variables, train, config, meta)
  unchained = chained_reference(model, variables, train, config, meta, chain=False)
  # The first chunk of each ipc index is the clean synthesis; later ones carry the chain.
  np.testing.assert_array_equal(reference[1, 0][0], unchained[1, 0][0])
  assert not np.allclose(reference[1, 1][0], unchained[1, 1][0], atol=1e-3)

  # Interrupted after the first finished batch, then rerun: the carry comes from disk.
  calls = {"n": 0}
  save_done = progress_lib.Progress.save_done

  def crash_after_first(self, *args, **kwargs):
    if calls["n"] == 1:
      raise KeyboardInterrupt
    calls["n"] += 1
    return save_done(self, *args, **kwargs)

  monkeypatch.setattr(progress_lib.Progress, "save_done", crash_after_first)
  with pytest.raises(KeyboardInterrupt):
    recover.synthesize_owned(presets.resolve(config), tmp_path, "dwa", train, model, variables, meta,
                             devices=jax.devices()[:2])
  monkeypatch.setattr(progress_lib.Progress, "save_done", save_done)
  progress = recover.synthesize_owned(presets.resolve(config), tmp_path, "dwa", train, model, variables, meta,
                                      devices=jax.devices()[:2])
  for (i, j), (x, delta_norm) in reference.items():
    ours, summary = progress.load_done(i, j)
    np.testing.assert_allclose(ours, x, rtol=0, atol=1e-6)
    np.testing.assert_allclose(summary["delta_norm"], delta_norm, rtol=1e-6)
    assert 0 < summary["delta_norm_chunk"] <= 0.015 + 1e-6
  # Only each chain's last carry is left (the stage removes the whole progress folder later).
  assert sorted(p.name for p in (progress.root / "carry").iterdir()) == [
      "batch_00000_001.npz", "batch_00001_001.npz"]
