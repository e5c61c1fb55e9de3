"""Multi-process runs on one machine (jax.distributed over local processes, one CPU device
each): a preflight failure on one process ends every process within seconds with the same one
line; recover's batches spread evenly and give the bytes of a 1-process run; a process that
dies is noticed by the one waiting for it."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dwa_jax import convert, files, multihost
from dwa_jax.models import build_model

REPO = pathlib.Path(__file__).resolve().parents[1]
QUICK = ("--config=configs/demo_digits.py", "--config.teacher.epochs=1",
         "--config.relabel.epochs=1", "--config.relabel.seeds=(0,)", "--config.methods=('dwa',)")
# Preflight ends a run in a few seconds; the bound leaves room for starting Python and JAX on a
# loaded 2-core machine.
FAIL_FAST_S = 60


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(count: int, args_for):
  """`count` local processes of one run; `args_for(k)`: process k's own arguments."""
  address = f"127.0.0.1:{free_port()}"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "DWA_JAX_XLA_DEFAULTS": "0",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  return [subprocess.Popen(
      [sys.executable, "-m", "dwa_jax.main", *args_for(k), f"--coordinator_address={address}",
       f"--num_processes={count}", f"--process_id={k}"], cwd=REPO, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(count)]


def outcomes(procs, timeout):
  out = []
  for proc in procs:
    try:
      _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
    out.append((proc.returncode, err))
  return out


def error_lines(err: str) -> list[str]:
  return [line for line in err.splitlines() if line.startswith("dwa_jax: ")]


@pytest.fixture(scope="module")
def teacher_npz(tmp_path_factory):
  """The demo's ConvNet as a state-dict .npz, for teacher.checkpoint."""
  model = build_model("convnet", 10)
  variables = model.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))
  path = tmp_path_factory.mktemp("teacher") / "convnet.npz"
  files.save_npz(path, **convert.variables_to_state_dict(variables))
  return path


def assert_all_fail_at_once(procs, *expected):
  started = time.time()
  results = outcomes(procs, timeout=FAIL_FAST_S)
  elapsed = time.time() - started
  lines = []
  for code, err in results:
    assert code == 2, err[-2000:]
    (line,) = error_lines(err)  # one line, and no traceback
    assert "Traceback" not in err, err[-2000:]
    lines.append(line)
  assert len(set(lines)) == 1, lines  # every process says the same
  for text in expected:
    assert text in lines[0], lines[0]
  assert elapsed < FAIL_FAST_S
  return lines[0]


def test_one_process_lacking_the_teacher_file_ends_every_process(tmp_path, teacher_npz):
  missing = tmp_path / "elsewhere" / "convnet.npz"
  procs = launch(2, lambda k: (*QUICK, f"--workdir={tmp_path / 'run'}", "--config.stage=squeeze",
                               f"--config.teacher.checkpoint={teacher_npz if k == 0 else missing}"))
  assert_all_fail_at_once(procs, "process 1 on host", str(missing))


def test_processes_that_do_not_share_the_workdir_end_at_once(tmp_path):
  procs = launch(2, lambda k: (*QUICK, f"--workdir={tmp_path / f'run{k}'}"))
  assert_all_fail_at_once(procs, "process 1 on host", "not the directory process 0 sees")


def test_one_process_with_a_wrong_data_path_ends_every_process(tmp_path):
  images = np.zeros((20, 8, 8, 1), np.uint8)
  np.savez(tmp_path / "data.npz", images=images, labels=np.arange(20) % 10)
  wrong = tmp_path / "missing.npz"
  procs = launch(2, lambda k: (*QUICK, f"--workdir={tmp_path / 'run'}",
                               f"--config.dataset=npz:{tmp_path / 'data.npz' if k == 0 else wrong}"))
  assert_all_fail_at_once(procs, "process 1 on host", str(wrong))


RECOVER = (*QUICK, "--config.stage=recover", "--config.ipc=5", "--config.recover.classes_per_batch=5",
           "--config.recover.iterations=4", "--config.recover.adjust_steps=2",
           "--config.recover.checkpoint_every=0")


@pytest.fixture(scope="module")
def recovered(tiny_run, tmp_path_factory):
  """The session's tiny teacher (the digits demo's ConvNet after one epoch), and its 1-process
  recover: the reference set."""
  base = tiny_run
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "DWA_JAX_XLA_DEFAULTS": "0",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  one = tmp_path_factory.mktemp("one")
  shutil.copytree(base / "teacher", one / "teacher")
  subprocess.run([sys.executable, "-m", "dwa_jax.main", *RECOVER, f"--workdir={one}"], cwd=REPO,
                 env=env, check=True, capture_output=True)
  return base, (one / "synthetic" / "dwa" / "images.npz").read_bytes()


def batches_per_process(workdir, count: int) -> list[int]:
  counts = []
  for k in range(count):
    log = workdir / ("metrics.jsonl" if k == 0 else f"metrics.p{k}.jsonl")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    counts.append(sum(r["stage"] == "recover/dwa" for r in records))
  return counts


# Two processes giving the one-process bytes is also what tests/test_scale.py checks (two devices
# each); three make the uneven spread (10 batches), so two run in the slow suite only.
@pytest.mark.parametrize("count", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_recover_batches_spread_evenly_and_give_the_one_process_bytes(recovered, tmp_path,
                                                                      count):
  base, reference = recovered
  shutil.copytree(base / "teacher", tmp_path / "teacher")
  for code, err in outcomes(launch(count, lambda k: (*RECOVER, f"--workdir={tmp_path}")), 600):
    assert code == 0, err[-3000:]
  counts = batches_per_process(tmp_path, count)
  assert sum(counts) == 10 and max(counts) - min(counts) <= 1, counts  # a group is one batch
  # One device per process, one program: the same bytes as one process computing them all.
  assert (tmp_path / "synthetic" / "dwa" / "images.npz").read_bytes() == reference


def test_a_process_that_dies_is_noticed_by_the_one_waiting_for_it(recovered, tmp_path):
  base, _ = recovered
  shutil.copytree(base / "teacher", tmp_path / "teacher")
  procs = launch(2, lambda k: (*RECOVER, f"--workdir={tmp_path}",
                               "--config.recover.iterations=200",
                               "--config.multihost.stale_after_s=5"))
  done = tmp_path / "progress" / "dwa" / "done"
  deadline = time.time() + 300
  while not (done.exists() and any(done.iterdir())):
    assert time.time() < deadline and procs[0].poll() is None, procs[0].communicate()[1][-2000:]
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGKILL)
  code, err = outcomes(procs[:1], timeout=300)[0]
  procs[1].wait()
  assert code == 2, err[-2000:]
  (line,) = error_lines(err)
  assert "process 1" in line and "stopped" in line and "heartbeat" in line, line


def test_launcher_counts_decide_the_start(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(a))
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  assert multihost.initialize(environ={}) is None  # nothing says several processes
  assert multihost.initialize(environ={"SLURM_NTASKS": "1"}) is None
  assert multihost.initialize(environ={"SLURM_NTASKS": "4"}) == "SLURM"
  assert calls == [()]  # no arguments: JAX reads the cluster's own settings
  assert multihost.initialize(environ={"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == "Cloud TPU"
  assert multihost.initialize(mode="on", environ={}) == "jax"
  assert multihost.initialize(mode="off", environ={"SLURM_NTASKS": "4"}) is None
  assert multihost.initialize("host:1234", 4, 1, environ={"SLURM_NTASKS": "4"}) == "flags"
  assert calls[-1] == ("host:1234", 4, 1)
  calls.clear()
  with pytest.raises(multihost.StartError, match="different process counts"):
    multihost.initialize(environ={"SLURM_NTASKS": "4", "OMPI_COMM_WORLD_SIZE": "2"})
  with pytest.raises(multihost.StartError, match="--num_processes=2"):
    multihost.initialize("host:1234", 2, 0, environ={"SLURM_NTASKS": "4"})
  with pytest.raises(multihost.StartError, match="JAX started 4"):
    multihost.initialize(environ={"OMPI_COMM_WORLD_SIZE": "8"})
  with pytest.raises(multihost.StartError, match="contradicts"):
    multihost.initialize("host:1234", 2, 0, mode="off", environ={})


def test_no_private_jax_module_is_imported():
  for path in (REPO / "dwa_jax").rglob("*.py"):
    assert "jax._src" not in path.read_text(), path
