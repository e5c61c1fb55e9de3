"""The Colab notebook: its .ipynb matches the jupytext source, and it runs (in smoke mode) as on
Colab: a fresh environment, the notebook's own install, a directory outside the clone."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

COLAB = pathlib.Path(__file__).resolve().parents[1] / "colab"


def test_notebook_is_in_sync_with_its_source():
  jupytext = pytest.importorskip("jupytext")
  source = jupytext.read(COLAB / "dwa_jax_demo.py")
  notebook = json.loads((COLAB / "dwa_jax_demo.ipynb").read_text())
  cells = lambda nb: [(c["cell_type"], "".join(c["source"]).strip()) for c in nb["cells"]]
  assert cells(notebook) == cells(json.loads(jupytext.writes(source, fmt="ipynb"))), (
      "colab/dwa_jax_demo.ipynb is stale: run `jupytext --sync colab/dwa_jax_demo.py`")


@pytest.mark.slow  # about 2 minutes: a fresh virtual environment and a non-editable install
def test_notebook_installs_and_runs_as_on_colab(tmp_path):
  """Nothing from this checkout is importable: the notebook's install cell must find the clone
  it sits in (no environment variable names it) and `pip install` it, which must bring
  everything its cells use, the config files included."""
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
  python = venv / "bin" / "python"
  clone = tmp_path / "clone"
  tracked = subprocess.run(["git", "ls-files"], cwd=COLAB.parent, capture_output=True,
                           text=True, check=True).stdout.split()
  for name in tracked:
    (clone / name).parent.mkdir(parents=True, exist_ok=True)
    (clone / name).write_bytes((COLAB.parent / name).read_bytes())
  work = clone / "colab"  # where Jupyter starts a notebook of the clone
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "VIRTUAL_ENV", "DWA_REPO_URL", "JAX_PLATFORMS")}
  env.update(DWA_SMOKE="1")
  proc = subprocess.run([str(python), str(work / "dwa_jax_demo.py")], cwd=work, env=env,
                        capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "backend: cpu" in proc.stdout
  assert "| dwa | 1 | 1 |" in proc.stdout and "| sre2l | 1 | 1 |" in proc.stdout
  assert (work / "workdir" / "colab_demo" / "synthetic" / "dwa" / "grid.png").exists()
  assert "squeeze: teacher convnet" in proc.stdout  # the command-line cell, packaged config
  installed = subprocess.run([str(python), "-c", "import dwa_jax; print(dwa_jax.__file__)"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
  assert str(venv) in installed.stdout  # the installed copy ran, not the clone's sources


def test_install_cell_without_a_clone_or_url_says_what_to_set(tmp_path):
  """Opened on its own (no clone around it, REPO_URL empty) and without dwa_jax installed, the
  first cell stops with one line saying what to fill in, before anything else runs."""
  jupytext = pytest.importorskip("jupytext")
  first = jupytext.read(COLAB / "dwa_jax_demo.py").cells[1]["source"]
  script = tmp_path / "first_cell.py"
  script.write_text(first)
  env = {k: v for k, v in os.environ.items() if k != "DWA_REPO_URL"}
  # A python that cannot import dwa_jax: isolated mode, and no site-packages.
  proc = subprocess.run([sys.executable, "-I", "-S", str(script)], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "set REPO_URL in this cell" in proc.stderr
