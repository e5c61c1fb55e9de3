"""The Colab notebook: its .ipynb matches the jupytext source, and it runs in smoke mode."""

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


def test_notebook_runs_end_to_end_in_smoke_mode(tmp_path):
  env = {**os.environ, "DWA_SMOKE": "1"}
  proc = subprocess.run([sys.executable, str(COLAB / "dwa_jax_demo.py")], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "backend: cpu" in proc.stdout
  assert "| dwa | 1 | 1 |" in proc.stdout and "| sre2l | 1 | 1 |" in proc.stdout
  assert (tmp_path / "workdir" / "colab_demo" / "synthetic" / "dwa" / "grid.png").exists()
