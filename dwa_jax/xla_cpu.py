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

Applied on `import dwa_jax` only where JAX will run on the CPU, and not when
  * JAX is going to use an accelerator: JAX_PLATFORMS names another platform first, or a GPU or
    TPU is present (an NVIDIA or AMD GPU device node, a TPU device node or TPU environment
    variables): XLA_FLAGS is then left exactly as the user set it;
  * DWA_JAX_XLA_DEFAULTS=0 is set, or XLA_FLAGS already chooses the YNNPACK fusion types;
  * the installed jaxlib is not a release this was measured on (an unknown flag would abort
    the process at backend start).
XLA reads XLA_FLAGS when JAX's backend starts (the first computation or device query): import
dwa_jax before that, or the option has no effect in this process (its child processes still
get it).
"""

import glob
import importlib.metadata
import os

TUNED_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=reduce",)
MEASURED_JAXLIB_SERIES = ("0.10.",)
OPT_OUT = "DWA_JAX_XLA_DEFAULTS"


def _jaxlib_version() -> str:
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return ""


def jaxlib_is_measured() -> bool:
  """Whether the installed jaxlib is a release TUNED_FLAGS were measured (and accepted) on."""
  return _jaxlib_version().startswith(MEASURED_JAXLIB_SERIES)


# Device nodes of accelerators JAX would pick over the CPU: NVIDIA and AMD (ROCm) GPUs, TPUs
# (v2-v4 expose /dev/accel*, later generations /dev/vfio/*).
ACCELERATOR_DEVICE_GLOBS = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")
TPU_ENVIRONMENT = ("TPU_NAME", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID", "COLAB_TPU_ADDR")


def accelerator_expected(environ) -> bool:
  """Whether JAX will run on a GPU or TPU here, decided before JAX starts (without importing
  it): JAX_PLATFORMS when set (its first entry), else accelerator device nodes or TPU
  environment variables."""
  platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").lower().split(",") if p.strip()]
  if platforms:
    return platforms[0] != "cpu"
  if any(environ.get(name) for name in TPU_ENVIRONMENT):
    return True
  return any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICE_GLOBS)


def apply_defaults(environ=None) -> bool:
  """Appends TUNED_FLAGS to XLA_FLAGS when JAX will run on the CPU and that is safe and
  wanted; True if it did."""
  environ = os.environ if environ is None else environ
  current = environ.get("XLA_FLAGS", "")
  if (environ.get(OPT_OUT, "1") == "0" or "ynn_fusion_type" in current
      or accelerator_expected(environ) or not jaxlib_is_measured()):
    return False
  environ["XLA_FLAGS"] = " ".join([current, *TUNED_FLAGS]).strip()
  return True
