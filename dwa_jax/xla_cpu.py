"""XLA:CPU options that make this package's programs faster, set before JAX's backend starts.

XLA:CPU hands convolutions and reductions to its YNNPACK library by default. On the project's
CPUs YNNPACK's convolutions are up to 1.8x slower than XLA's own (Eigen) ones for 64-channel
layers, while its reductions (the BN statistics) are much faster than XLA's. Restricting YNNPACK
to reductions makes a ResNet-18 synthesis iteration ~19 % faster, a DWA ascent pass ~25 % and
a training step 23-32 % (benchmarks/README.md). The flag changes float32 results only in the
last bits (another summation order), never the maths. Its cost: float64 convolutions (only the
parity check uses them) run ~6x slower, and on one CPU with 4 or 8 forced host devices the
images differ in the last bits from a 1-device run (each device count stays deterministic);
with stock options they are the same bytes. Set DWA_JAX_XLA_DEFAULTS=0 for float64 work or for
that guarantee (the test suite does).

Applied on `import dwa_jax` unless
  * DWA_JAX_XLA_DEFAULTS=0 is set, or XLA_FLAGS already chooses the YNNPACK fusion types;
  * the installed jaxlib is not a release this was measured on (an unknown flag would abort
    the process at backend start);
  * JAX's backend is already running (then it cannot take effect; import dwa_jax first).
"""

import importlib.metadata
import os
import sys

TUNED_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=reduce",)
MEASURED_JAXLIB_SERIES = ("0.10.",)
OPT_OUT = "DWA_JAX_XLA_DEFAULTS"


def _backend_started() -> bool:
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    return True  # cannot tell: assume the worst and leave the flags alone


def _jaxlib_version() -> str:
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return ""


def jaxlib_is_measured() -> bool:
  """Whether the installed jaxlib is a release TUNED_FLAGS were measured (and accepted) on."""
  return _jaxlib_version().startswith(MEASURED_JAXLIB_SERIES)


def apply_defaults(environ=None) -> bool:
  """Appends TUNED_FLAGS to XLA_FLAGS when that is safe and wanted; True if it did."""
  environ = os.environ if environ is None else environ
  current = environ.get("XLA_FLAGS", "")
  if (environ.get(OPT_OUT, "1") == "0" or "ynn_fusion_type" in current
      or not jaxlib_is_measured() or _backend_started()):
    return False
  environ["XLA_FLAGS"] = " ".join([current, *TUNED_FLAGS]).strip()
  return True
