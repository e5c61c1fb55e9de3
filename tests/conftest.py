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
# One temporary folder for the test session, made by the first pytest process (the controller)
# and inherited through the environment by its workers and every process a test starts; the
# controller removes it at the end. It holds the data caches (decoded CIFAR-10 JPEGs, tfds label
# lists; not ~/.cache) and, unless one is given, the XLA compilation cache.
import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position
_SESSION_OWNER = "DWA_JAX_TEST_TMP" not in os.environ
if _SESSION_OWNER:
  os.environ["DWA_JAX_TEST_TMP"] = tempfile.mkdtemp(prefix="dwa_jax_test_")
SESSION_TMP = pathlib.Path(os.environ["DWA_JAX_TEST_TMP"])
os.environ["DWA_CACHE_DIR"] = str(SESSION_TMP / "data_cache")
# One XLA compilation cache for the session: every worker and every process a test starts
# reuses what another compiled, since many tests compile the same small programs. An entry is
# keyed on the program, the compile options and XLA_FLAGS, and holds the executable XLA built,
# so results are the same bits. A size bound turns on its file lock, so concurrent processes
# never read a half-written entry. tests/test_memory.py leaves it out: compilation is part of
# the peak memory it compares.
if _SESSION_OWNER and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = str(SESSION_TMP / "xla_cache")
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


def one_dwa_jax_line(err: str) -> str:
  """The one `dwa_jax:` line of a failed or interrupted run's stderr, which is its last line,
  with no traceback anywhere (progress bars and library warnings may come before it)."""
  lines = err.strip().splitlines()
  assert "Traceback" not in err, err[-3000:]
  ours = [line for line in lines if line.startswith("dwa_jax:")]
  assert len(ours) == 1 and lines[-1] == ours[0], lines[-5:]
  return ours[0]


def official_config(config_file: pathlib.Path, iterations: int):
  """`config_file` with --config.compat=official --config.recover.iterations=T, resolved as
  `python -m dwa_jax.main` resolves it: what a parity test must reproduce the recording from."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from dwa_jax import presets  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(config_file.stem, config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.compat = "official"
  config.recover.iterations = iterations
  return presets.resolve(config)


def parity_recording(folder: pathlib.Path):
  """The mark of a test module that replays the recording in `folder`: skipped, with the reason,
  where the recording is missing; but where DWA_REQUIRE_PARITY is set (.ci/run sets it) a
  missing recording is an error, since the parity tests are the only independent check of the
  synthesis maths and a skip would read as green."""
  if (folder / "record.json").exists():
    return pytest.mark.skipif(False, reason="")
  if os.environ.get("DWA_REQUIRE_PARITY"):
    raise FileNotFoundError(f"parity recording not found at {folder}, and DWA_REQUIRE_PARITY is "
                            "set: ../shared must lie beside the repository (or DWA_SHARED_DIR)")
  return pytest.mark.skip(reason=f"parity recording not found at {folder} (needs ../shared "
                          "beside the repository, or DWA_SHARED_DIR)")


# The longest files first (seconds in a full run: --durations=0). pytest-xdist's loadfile hands a
# worker its next file when the current one is nearly done, so a long file handed out last would
# leave one worker running alone at the end; pyproject.toml turns off xdist's own order (most
# tests first) with --no-loadscope-reorder. Files not listed follow in collection order.
LONGEST_FIRST = ("test_data_parallel.py", "test_parity_imagenet.py", "test_recover.py",
                 "test_parity.py", "test_scale.py", "test_benchmarks.py", "test_multihost.py",
                 "test_docs.py", "test_arithmetic.py", "test_memory.py", "test_committee.py",
                 "test_pipeline.py", "test_bad_files.py", "test_interrupts.py", "test_zoo.py",
                 "test_protocol.py", "test_compat.py", "test_errors.py", "test_xla_cpu.py",
                 "test_augment.py")


def pytest_collection_modifyitems(items):
  rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order kept


def pytest_unconfigure(config):
  del config
  if _SESSION_OWNER:  # the controller, after its workers have ended
    shutil.rmtree(SESSION_TMP, ignore_errors=True)


def _built_once(name: str, config) -> pathlib.Path:
  """SESSION_TMP/name holding a complete `dwa_jax.main` run of `config`, built by the first
  process that asks for it (under a file lock) and read by the others."""
  import filelock  # pylint: disable=g-import-not-at-top
  from dwa_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  path, done = SESSION_TMP / name, SESSION_TMP / f"{name}.done"
  with filelock.FileLock(str(SESSION_TMP / f"{name}.lock")):
    if not done.exists():
      shutil.rmtree(path, ignore_errors=True)
      assert main_lib.execute(config, path) == 0
      done.touch()
  return path


@pytest.fixture(scope="session")
def tiny_run():
  """A complete run of `dwa_jax.testing.tiny_config()` (teacher, synthetic set, results), built
  once for the session: copy it before running anything in it."""
  from dwa_jax.testing import tiny_config  # pylint: disable=g-import-not-at-top
  return _built_once("tiny_run", tiny_config())


@pytest.fixture(scope="module")
def finished(tiny_run, tmp_path_factory):
  """This module's own copy of `tiny_run`."""
  path = tmp_path_factory.mktemp("finished") / "run"
  shutil.copytree(tiny_run, path)
  return path


@pytest.fixture(scope="session")
def tiny_teacher_seed1():
  """The squeeze stage of `tiny_config()` with seed 1 (a second teacher beside `tiny_run`'s),
  built once for the session: copy it before running anything in it."""
  from dwa_jax.testing import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.stage, config.seed = "squeeze", 1
  return _built_once("tiny_teacher_seed1", config)
