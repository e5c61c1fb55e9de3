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


@pytest.mark.slow  # about 1.5 minutes: a fresh virtual environment and a non-editable install
def test_notebook_installs_and_runs_as_on_colab(tmp_path):
  """Nothing from this checkout is importable: the notebook's install cell (`pip install` of the
  repository, as `pip install git+URL` on Colab) must bring everything its cells use, the
  config files included, and the cells run from a directory outside the repository."""
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
  python = venv / "bin" / "python"
  work = tmp_path / "colab"
  work.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env.update(DWA_SMOKE="1", DWA_INSTALL="1", DWA_REPO_URL=str(COLAB.parent))
  proc = subprocess.run([str(python), str(COLAB / "dwa_jax_demo.py")], cwd=work, env=env,
                        capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "backend: cpu" in proc.stdout
  assert "| dwa | 1 | 1 |" in proc.stdout and "| sre2l | 1 | 1 |" in proc.stdout
  assert (work / "workdir" / "colab_demo" / "synthetic" / "dwa" / "grid.png").exists()
  assert "squeeze: teacher convnet" in proc.stdout  # the command-line cell, packaged config
  installed = subprocess.run([str(python), "-c", "import dwa_jax; print(dwa_jax.__file__)"],
                             cwd=work, env=env, capture_output=True, text=True, check=True)
  assert str(venv) in installed.stdout  # the installed copy ran, not the checkout
