"""Runs that are interrupted (Ctrl-C) or started twice on one work directory."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from conftest import one_dwa_jax_line
from dwa_jax import cli
from dwa_jax import main as main_lib
from dwa_jax import presets

REPO = pathlib.Path(__file__).resolve().parents[1]


def command(workdir, *extra):
  return [sys.executable, "-m", "dwa_jax.main", "--config=configs/demo_digits.py",
          f"--workdir={workdir}", "--config.stage=squeeze", *extra]


def env():
  return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def test_the_workdir_lock_is_exclusive_and_released(tmp_path):
  with cli.workdir_lock(tmp_path):
    with pytest.raises(cli.WorkdirInUse, match="in use by another dwa_jax run"):
      with cli.workdir_lock(tmp_path):
        pass
  with cli.workdir_lock(tmp_path):  # released on exit
    pass
  assert not list(tmp_path.iterdir())  # the lock writes nothing into the directory


HOLDER = """
import sys, time
from dwa_jax.cli import workdir_lock
import pathlib
with workdir_lock(pathlib.Path(sys.argv[1])):
  print("locked", flush=True)
  time.sleep(600)
"""


def test_a_second_run_refuses_and_a_killed_run_leaves_no_lock(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    second = subprocess.run(command(tmp_path, "--config.teacher.epochs=1"), cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 2
    assert one_dwa_jax_line(second.stderr).startswith(
        f"dwa_jax: error: workdir '{tmp_path}' is in use by another dwa_jax run")
    assert not (tmp_path / "teacher").exists()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  third = subprocess.run(command(tmp_path, "--config.teacher.epochs=1"), cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=300)
  assert third.returncode == 0, third.stderr[-2000:]


def squeeze_epochs(workdir) -> list[int]:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  return [r["step"] for r in map(json.loads, path.read_text().splitlines())
          if r["stage"] == "squeeze" and "train_loss" in r]


def test_ctrl_c_exits_promptly_with_one_line_and_the_rerun_resumes(tmp_path):
  args = ("--config.teacher.epochs=10", "--config.teacher.batch_size=32",
          "--config.teacher.save_every_epochs=1")
  proc = subprocess.Popen(command(tmp_path, *args), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while len(squeeze_epochs(tmp_path)) < 3 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.1)
  assert proc.poll() is None, "the run ended before it could be interrupted"
  proc.send_signal(signal.SIGINT)
  sent = time.time()
  _, err = proc.communicate(timeout=60)
  assert time.time() - sent < 20  # promptly: the current step, not the rest of the run
  assert proc.returncode == 130
  assert one_dwa_jax_line(err).startswith("dwa_jax: interrupted; rerun the same command to resume")
  rerun = subprocess.run(command(tmp_path, *args), cwd=REPO, env=env(), capture_output=True,
                         text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  resumed = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
             if r["stage"] == "squeeze/resume"]
  assert resumed and resumed[0]["resumed_after_epoch"] >= 2


def test_keyboard_interrupt_in_any_stage_gives_the_resume_line(tmp_path, capfd, monkeypatch):
  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
  for stage in ("squeeze", "recover", "relabel"):
    module = getattr(main_lib, stage)
    with monkeypatch.context() as m:
      m.setattr(module, "run", interrupted)
      m.setattr(main_lib, "check_inputs", lambda *a: None)  # no teacher here: the stage is faked
      config = presets.demo_digits()
      config.stage = stage
      capfd.readouterr()
      assert main_lib.execute(config, tmp_path) == 130
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [f"dwa_jax: interrupted; rerun the same command to resume from the progress "
                   f"saved in '{tmp_path}'"]
