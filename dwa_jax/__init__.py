"""DWA and SRe2L dataset distillation in JAX/Flax (squeeze, recover, relabel)."""

from importlib import metadata

from dwa_jax import xla_cpu

xla_cpu.apply_defaults()

try:
  __version__ = metadata.version("dwa_jax")
except metadata.PackageNotFoundError:  # a source tree used without installing it
  __version__ = "0.1.0"
