"""A missing optional package ends a run with one line that names the extra to install."""

import pathlib
import subprocess
import sys

import pytest

from dwa_jax import data

REPO = pathlib.Path(__file__).resolve().parents[1]

# Runs a module as `python -m` would, with torch unimportable, as on a machine without it.
WITHOUT_TORCH = """
import runpy, sys
class NoTorch:
  def find_spec(self, name, path=None, target=None):
    if name.partition(".")[0] in ("torch", "torchvision"):
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run_without_torch(module: str, *args: str, cwd) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, module, *args], cwd=cwd,
                        capture_output=True, text=True, timeout=600)


def test_a_pth_teacher_without_torch_names_the_torch_extra(tmp_path):
  (tmp_path / "teacher.pth").write_bytes(b"PK\x03\x04 not read: torch is missing")
  proc = run_without_torch(
      "dwa_jax.main", f"--config={REPO / 'configs' / 'demo_digits.py'}",
      f"--workdir={tmp_path / 'run'}", f"--config.teacher.checkpoint={tmp_path / 'teacher.pth'}",
      "--config.stage=squeeze", cwd=tmp_path)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "pip install 'dwa_jax[torch]'" in lines[-1] and "Traceback" not in proc.stderr


def test_the_converter_without_torch_names_the_torch_extra(tmp_path):
  (tmp_path / "resnet18.pth").write_bytes(b"not read: torch is missing")
  proc = run_without_torch("dwa_jax.convert", "--model=resnet18", "--num_classes=10",
                           f"--input={tmp_path / 'resnet18.pth'}",
                           f"--output={tmp_path / 'out.npz'}", cwd=tmp_path)
  assert proc.returncode == 2
  assert proc.stderr.count("\n") == 1 and "pip install 'dwa_jax[torch]'" in proc.stderr
  assert not (tmp_path / "out.npz").exists()


def test_preparing_tfds_data_without_tensorflow_names_the_prepare_extra(monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class Builder:
    def download_and_prepare(self):
      raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")

  monkeypatch.setattr(tfds, "builder", lambda *args, **kwargs: Builder())
  with pytest.raises(data.DataError, match=r"pip install 'dwa_jax\[prepare\]'"):
    data.prepare_tfds("cifar10", None)
