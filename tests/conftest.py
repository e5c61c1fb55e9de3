"""Test setup: the CPU with 8 forced devices and stock XLA options (set before JAX starts),
shared data."""

import os
import pathlib

# The CPU, also on a machine with a GPU or TPU: the forced host devices below, the float64 parity
# and the tolerances are CPU facts (benchmarks/accelerator_check.py measures accelerators).
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
# The suite runs with XLA's stock CPU options: the tuned ones (dwa_jax/xla_cpu.py) make float64
# convolutions ~6x slower, and the float64 parity test would take 14 min instead of 1.5.
# tests/test_xla_cpu.py checks the tuned configuration computes the same synthesis.
os.environ.setdefault("DWA_JAX_XLA_DEFAULTS", "0")
# Caches (decoded CIFAR-10 JPEGs, tfds label lists) in a folder of this test session, not ~/.cache.
import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position
os.environ["DWA_CACHE_DIR"] = tempfile.mkdtemp(prefix="dwa_jax_test_cache_")
# One XLA compilation cache for the session: every worker and every process a test starts
# (inherited through the environment) reuses what another compiled, since many tests compile
# the same small programs. An entry is keyed on the program, the compile options and XLA_FLAGS,
# and holds the executable XLA built, so results are the same bits. A size bound turns on its
# file lock, so concurrent processes never read a half-written entry. tests/test_memory.py
# leaves it out: compilation is part of the peak memory it compares.
_XLA_CACHE_OWNER = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _XLA_CACHE_OWNER:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dwa_jax_test_xla_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)

import shutil  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# ../shared beside the repository (CI clones main with shared/ next to it); overridable.
SHARED_DIR = pathlib.Path(os.environ.get(
    "DWA_SHARED_DIR", pathlib.Path(__file__).resolve().parents[2] / "shared"))


@pytest.fixture(scope="session")
def shared_dir():
  return SHARED_DIR


def pytest_unconfigure(config):
  del config
  if _XLA_CACHE_OWNER:  # the process that made the cache (the controller), after the workers
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
