"""Test setup: 8 forced CPU devices (set before JAX starts) and the shared-data location."""

import os
import pathlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# ../shared beside the repository (CI clones main with shared/ next to it); overridable.
SHARED_DIR = pathlib.Path(os.environ.get(
    "DWA_SHARED_DIR", pathlib.Path(__file__).resolve().parents[2] / "shared"))


@pytest.fixture(scope="session")
def shared_dir():
  return SHARED_DIR
