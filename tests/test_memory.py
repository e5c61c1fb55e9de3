"""Memory is bounded by design: the peak resident memory of recover and relabel does not grow
with the synthetic set.

Each stage runs through the command line in a process of its own (one device, XLA's options as
a user gets them), once on a set and once on one 8x larger, and the test compares the two
processes' peak resident memory (wait4's ru_maxrss):

  relabel  1,000 vs 8,000 images (64 x 64 RGB float32: 49 vs 393 MB), written in the layout
           recover leaves (images.npz + manifest), so relabel's own reading path runs: the
           manifest's sha256, the set's checks and the input pipeline;
  recover  ipc 8 vs 64 (800 vs 6,400 images: 38 vs 300 MB), DWA from real images, 1 iteration.

Measured on a 2-core x86 CPU: relabel -3 MB and recover +42 MB from the smaller to the larger
set (recover's peak is the largest of its batches' programs, so more batches raise it a
little); a set check that read the set whole (as rows, then stacked) made relabel's peak grow
by 1,674 MB, and keeping recover's finished batches until the end made recover's grow by
230 MB. The teacher is an untrained model: memory does not depend on its accuracy.
"""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from dwa_jax import files, synthetic_outputs, teacher_store
from dwa_jax.models import build_model

REPO = pathlib.Path(__file__).resolve().parents[1]
CLASSES, SIZE = 100, 64
RELABEL_IMAGES = (1_000, 8_000)
RECOVER_IPC = (8, 64)
GROWTH_BOUND_MB = 80  # between the growth measured (-3, +42 MB) and a whole set's (+230 MB)


def run_stage(workdir, data_file, stage: str, ipc: int) -> float:
  """Runs one stage in a fresh single-device process; returns its peak RSS in MB."""
  cmd = [sys.executable, "-m", "dwa_jax.main", "--config=configs/demo_digits.py",
         f"--workdir={workdir}", f"--config.stage={stage}", f"--config.dataset=npz:{data_file}",
         f"--config.ipc={ipc}", "--config.methods=('dwa',)",
         "--config.teacher.model=convnet_w16_d5", "--config.relabel.student=convnet_w16_d5",
         "--config.recover.iterations=1", "--config.recover.adjust_steps=1",
         "--config.recover.checkpoint_every=0", "--config.relabel.epochs=1",
         "--config.relabel.batch_size=64", "--config.relabel.seeds=(0,)",
         "--config.relabel.random_real_baseline=False"]
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "DWA_JAX_XLA_DEFAULTS")
         and not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env=env)
  output = proc.stdout.read().decode(errors="replace")
  _, status, usage = os.wait4(proc.pid, 0)
  assert os.waitstatus_to_exitcode(status) == 0, f"{stage} failed:\n{output[-3000:]}"
  return usage.ru_maxrss / 1024  # KiB on Linux


def write_set(workdir, n: int, rng) -> float:
  """A synthetic set of `n` float images in [0, 1] where recover leaves one; its size in MB."""
  out = pathlib.Path(workdir) / "synthetic" / "dwa"
  with files.NpzWriter(out / "images.npz") as npz:
    with npz.rows("images", (n, SIZE, SIZE, 3), np.float32) as write:
      for start in range(0, n, 500):
        write(rng.random((min(500, n - start), SIZE, SIZE, 3), np.float32))
    npz.add("labels", np.arange(n, dtype=np.int32) % CLASSES)
  synthetic_outputs.write_manifest(out, ["images.npz"])
  return (out / "images.npz").stat().st_size / 2**20


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """The data (enough real images per class for DWA's initialisation) and an untrained
  teacher."""
  root = tmp_path_factory.mktemp("memory")
  rng = np.random.default_rng(0)
  data_file = root / "data.npz"
  train = max(RECOVER_IPC)
  np.savez(data_file,
           train_images=rng.integers(0, 256, (train * CLASSES, SIZE, SIZE, 3), np.uint8),
           train_labels=np.tile(np.arange(CLASSES), train),
           test_images=rng.integers(0, 256, (CLASSES, SIZE, SIZE, 3), np.uint8),
           test_labels=np.arange(CLASSES), mean=np.full(3, 0.5), std=np.full(3, 0.29))
  model = build_model("convnet_w16_d5", CLASSES)
  variables = model.init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32))
  meta = {"model": "convnet_w16_d5", "num_classes": CLASSES, "image_shape": [SIZE, SIZE, 3],
          "mean": [0.5] * 3, "std": [0.29] * 3, "dataset": f"npz:{data_file}",
          "test_accuracy": 1.0, "source": "untrained (memory test)"}

  def workdir(name):
    path = root / name
    teacher_store.save_teacher(path, variables, meta)
    return path

  return data_file, workdir, rng


def assert_bounded(stage, peaks, sizes_mb):
  (small, small_mb), (large, large_mb) = zip(peaks, sizes_mb)
  assert large - small < GROWTH_BOUND_MB, (
      f"{stage}: peak RSS {small:.0f} MB with a {small_mb:.0f} MB set, {large:.0f} MB with a "
      f"{large_mb:.0f} MB set: something holds or reads the whole set")


def test_relabel_peak_memory_does_not_grow_with_the_set(setup):
  data_file, workdir, rng = setup
  peaks, sizes = [], []
  for n in RELABEL_IMAGES:
    path = workdir(f"relabel_{n}")
    sizes.append(write_set(path, n, rng))
    peaks.append(run_stage(path, data_file, "relabel", n // CLASSES))
  assert sizes[1] > 350, sizes  # big enough for a whole read to show
  assert_bounded("relabel", peaks, sizes)


def test_recover_peak_memory_does_not_grow_with_the_set(setup):
  data_file, workdir, _ = setup
  peaks, sizes = [], []
  for ipc in RECOVER_IPC:
    path = workdir(f"recover_{ipc}")
    peaks.append(run_stage(path, data_file, "recover", ipc))
    sizes.append((path / "synthetic" / "dwa" / "images.npz").stat().st_size / 2**20)
  assert_bounded("recover", peaks, sizes)
