"""The speed benchmark runs (tiny mode) and writes its JSON; timings are not asserted."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_recover_speed_quick(tmp_path):
  out = tmp_path / "speed.json"
  proc = subprocess.run([sys.executable, "benchmarks/recover_speed.py", "--quick", f"--out={out}"],
                        cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  engine = result["engine"]["10"]
  assert engine["sre2l"]["gflop_per_iteration"] > 10  # ResNet-18 fwd + input grad, batch 10
  assert engine["dwa"]["adjust_seconds"] > 0 and result["matmul_peak_gflops"] > 0
  assert "s/iter" in proc.stdout
