"""DWA and SRe2L dataset distillation in JAX/Flax (squeeze, recover, relabel)."""

from dwa_jax import xla_cpu

xla_cpu.apply_defaults()
