"""Scale-out and preemption safety of the recover stage: devices, processes, SIGKILL, resume."""

import json
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dwa_jax import presets, recover, teacher_store

REPO = pathlib.Path(__file__).resolve().parents[1]
RECOVER_ARGS = ("--config.stage=recover", "--config.methods=('dwa',)", "--config.ipc=4",
                "--config.recover.iterations=60", "--config.recover.adjust_steps=3",
                "--config.recover.checkpoint_every=3", "--config.recover.checkpoint_every_s=0")


REFERENCE_SECONDS = []  # wall time of the uninterrupted run, to place the kills


def config(ipc=4, iterations=60):
  c = presets.demo_digits()
  c.methods, c.ipc, c.stage = ("dwa",), ipc, "recover"
  c.recover.iterations, c.recover.adjust_steps, c.recover.checkpoint_every = iterations, 3, 3
  c.recover.checkpoint_every_s = 0.0
  return c


@pytest.fixture(scope="module")
def teacher_dir(tiny_run):
  """The session's tiny teacher (the digits demo's ConvNet after one epoch): copied, never
  written."""
  return tiny_run / "teacher"


def workdir_with(teacher_dir, path) -> pathlib.Path:
  path.mkdir(parents=True, exist_ok=True)
  shutil.copytree(teacher_dir, path / "teacher")
  return path


def images_bytes(workdir) -> bytes:
  return (pathlib.Path(workdir) / "synthetic" / "dwa" / "images.npz").read_bytes()


def run_main(workdir, *extra, **popen):
  cmd = [sys.executable, "-m", "dwa_jax.main", "--config=configs/demo_digits.py",
         f"--workdir={workdir}", *RECOVER_ARGS, *extra]
  # Two devices per process: multi-device, while keeping per-device compiles cheap.
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env, **popen)


@pytest.fixture(scope="module")
def reference(teacher_dir, tmp_path_factory):
  """An uninterrupted single-process run of the command-line recover."""
  workdir = workdir_with(teacher_dir, tmp_path_factory.mktemp("reference"))
  started = time.time()
  proc = run_main(workdir)
  _, err = proc.communicate(timeout=300)
  REFERENCE_SECONDS.append(time.time() - started)
  assert proc.returncode == 0, err[-2000:]
  manifest = (workdir / "synthetic" / "dwa" / "manifest.json").read_text()
  assert "images.npz" in manifest and not (workdir / "progress" / "dwa").exists()
  return images_bytes(workdir)


# Float32 pixels (normalised units, ~[-2, 2]) of the same 8 batches run as one program in another
# layout, after 6 iterations: measured max |difference| 3.8e-6 on 1 device and with 4 batches per
# device (XLA compiles a one-device program, a partitioned one and other vmap sizes with other
# roundings; like any float32 rounding difference it can grow over many iterations).
LAYOUT_ATOL = 1e-4


def test_device_count_and_packing_keep_the_batches(teacher_dir, tmp_path):
  """The same 8 batches whatever the layout: bit-identical on 2 and on 8 devices (the same
  program, partitioned), within LAYOUT_ATOL on 1 device or with 4 batches per device; each
  layout compiles each program once, whatever the number of devices."""
  assert len(jax.devices()) == 8
  train_cfg = config(ipc=8, iterations=6)
  from dwa_jax import data
  train = data.load_dataset("digits", "train")
  outputs = {}
  for n_devices, per_device in ((8, 1), (2, 1), (1, 1), (2, 4)):
    workdir = workdir_with(teacher_dir, tmp_path / f"d{n_devices}p{per_device}")
    model, variables, meta = teacher_store.load_teacher(workdir, train)
    train_cfg.recover.batches_per_device = per_device
    progress = recover.synthesize_owned(presets.resolve(train_cfg), workdir, "dwa", train, model, variables, meta,
                                        devices=jax.devices()[:n_devices])
    outputs[n_devices, per_device] = [progress.load_done(i, 0) for i in range(8)]
    compiled = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
                if '"recover/dwa/compilations"' in line]
    assert compiled[-1]["start"] == 1 and compiled[-1]["advance"] == 1, compiled
  reference = outputs[8, 1]
  for (x, s), (x8, s8) in zip(outputs[2, 1], reference):
    np.testing.assert_array_equal(x, x8)
    assert s == s8
  for layout in ((1, 1), (2, 4)):
    worst = max(float(np.abs(x - x8).max()) for (x, _), (x8, _) in zip(outputs[layout], reference))
    print(f"layout {layout}: max pixel difference {worst:.3g}")
    assert worst <= LAYOUT_ATOL, (layout, worst)
  # Different batches got different Δθ (a cross-device gradient sum would make them equal).
  norms = {s["delta_norm"] for _, s in reference}
  assert len(norms) == 8


def saved_step(directory: pathlib.Path) -> bool:
  """Whether an Orbax manager directory holds a finished (renamed, not temporary) step."""
  try:
    return any(p.name.isdigit() for p in directory.iterdir())
  except FileNotFoundError:
    return False


def wait_for_saved_step(proc, directory: pathlib.Path, timeout: float = 300) -> None:
  """Waits until the Orbax manager in `directory` has saved a step (or `proc` ends): a kill
  after it is certain to leave something to resume from."""
  deadline = time.time() + timeout
  while not saved_step(directory) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)


# After the first kill (once an in-flight checkpoint is saved, so a resume is certain), more at
# random points: three in the slow suite, none in the default one.
@pytest.mark.parametrize("random_kills", [0, pytest.param(3, marks=pytest.mark.slow)])
def test_sigkill_resumes_bit_identically(teacher_dir, tmp_path, reference, random_kills):
  workdir = workdir_with(teacher_dir, tmp_path / "killed")
  rng = random.Random(1234)
  kills = 0
  for attempt in range(12):
    proc = run_main(workdir)
    if attempt == 0:
      wait_for_saved_step(proc, workdir / "progress" / "dwa" / "steps_p0")
    elif kills <= random_kills:
      time.sleep(rng.uniform(0.35, 0.9) * REFERENCE_SECONDS[0])
    if kills <= random_kills and proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      kills += 1
      continue
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    if kills > random_kills:
      break
    shutil.rmtree(workdir / "synthetic")  # finished too early: start over for more kills
  else:
    pytest.fail(f"no complete run after {kills} kills in 12 attempts")
  assert images_bytes(workdir) == reference
  # The reruns resumed saved work (an in-flight checkpoint or finished batches): a run whose
  # kills all came before the first checkpoint would not test resuming.
  resumes = [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
             if r["stage"] == "recover/dwa/resume"]
  assert any(r.get("inflight_iteration", 0) > 0 or r.get("finished_batches", 0) > 0
             for r in resumes), resumes


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_on_localhost_match_one_process(teacher_dir, tmp_path, reference):
  workdir = workdir_with(teacher_dir, tmp_path / "two")
  address = f"127.0.0.1:{free_port()}"
  procs = [run_main(workdir, f"--coordinator_address={address}", "--num_processes=2",
                    f"--process_id={k}") for k in range(2)]
  for k, proc in enumerate(procs):
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"process {k}: {err[-2000:]}"
  assert images_bytes(workdir) == reference
  summary = json.loads((workdir / "synthetic" / "dwa" / "recover.json").read_text())
  assert summary["stage"] == {"devices": 4, "processes": 2}  # 2 forced devices per process


def test_owned_batches_deal_batches_round_robin_between_processes():
  a = recover.owned_batches(5, 2, 0, 2)
  b = recover.owned_batches(5, 2, 1, 2)
  assert a == [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0)]
  assert b == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)]
  # ImageNet ipc 10 (10 class chunks) on 16 hosts: 7 or 6 batches each, every batch once.
  counts = [len(recover.owned_batches(10, 10, p, 16)) for p in range(16)]
  assert sorted(set(counts)) == [6, 7] and sum(counts) == 100
  # compat_q2 chains an ipc index's chunks: whole ipc indices are dealt out.
  assert recover.owned_batches(5, 2, 1, 2, chained=True) == [(1, 0), (1, 1), (3, 0), (3, 1)]


def test_in_flight_checkpoints_follow_the_clock_and_change_nothing(teacher_dir, tmp_path):
  """recover.checkpoint_every_s: with 0 the in-flight state is saved after every chunk of
  checkpoint_every iterations, each save logged with its seconds and size; with an hour none is
  saved in a short run; the images are the same bytes either way."""
  from dwa_jax import data
  train = data.load_dataset("digits", "train")
  images, saves = {}, {}
  for every_s in (0.0, 3600.0):
    cfg = config(ipc=1, iterations=9)
    cfg.recover.checkpoint_every_s = every_s
    workdir = workdir_with(teacher_dir, tmp_path / f"every_{every_s:g}")
    model, variables, meta = teacher_store.load_teacher(workdir, train)
    progress = recover.synthesize_owned(presets.resolve(cfg), workdir, "dwa", train, model, variables, meta,
                                        devices=jax.devices()[:1])
    images[every_s] = progress.load_done(0, 0)[0]
    saves[every_s] = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text()
                      .splitlines() if '"recover/dwa/checkpoint"' in line]
  assert [s["step"] for s in saves[0.0]] == [3, 6]  # after chunks of 3; none after the last
  assert all(s["seconds"] > 0 and s["megabytes"] > 0 for s in saves[0.0])
  assert saves[3600.0] == []
  np.testing.assert_array_equal(images[0.0], images[3600.0])
