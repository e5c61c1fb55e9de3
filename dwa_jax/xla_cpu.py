"""XLA:CPU options that make this package's programs faster, set before JAX's backend starts:
YNNPACK for reductions only, XLA's own (Eigen) convolutions (benchmarks/README.md measures them;
float32 results change in the last bits only). Applied on `import dwa_jax` only where JAX will
run on the CPU (with a GPU or TPU present or named first by JAX_PLATFORMS, XLA_FLAGS is left
exactly as set), and not with DWA_JAX_XLA_DEFAULTS=0 (for float64 work, or for forced
multi-device CPU runs that match a 1-device run bit for bit), nor when XLA_FLAGS already chooses
the YNNPACK fusion types, nor on a jaxlib release this was not measured on (an unknown flag would
abort the process at backend start). XLA reads XLA_FLAGS when JAX's backend starts: import
dwa_jax before that, or only this process's child processes get the option.
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
