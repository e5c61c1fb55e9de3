"""The XLA:CPU defaults applied on `import dwa_jax`: when they apply, and that jaxlib accepts them."""

import os
import subprocess
import sys

from dwa_jax import xla_cpu


def apply(monkeypatch, environ, started=False, jaxlib="0.10.2"):
  monkeypatch.setattr(xla_cpu, "_backend_started", lambda: started)
  monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: jaxlib)
  return xla_cpu.apply_defaults(environ)


def test_appends_to_existing_flags(monkeypatch):
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert apply(monkeypatch, env)
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8",
                                      *xla_cpu.TUNED_FLAGS]


def test_leaves_flags_alone_when_it_should_not_apply(monkeypatch):
  cases = [
      ({xla_cpu.OPT_OUT: "0"}, {}),
      ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}, {}),  # the user's choice
      ({}, {"started": True}),       # too late to take effect
      ({}, {"jaxlib": "0.11.0"}),    # not measured: the flag might not exist there
      ({}, {"jaxlib": ""}),
  ]
  for env, kwargs in cases:
    before = dict(env)
    assert not apply(monkeypatch, env, **kwargs), (env, kwargs)
    assert env == before


def test_import_applies_them_and_jax_runs_with_them():
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.OPT_OUT)}
  code = ("import os, dwa_jax, jax, jax.numpy as jnp; "
          "x = jnp.arange(12.).reshape(3, 4); print(float(x.mean(0).sum())); "
          "print(os.environ.get('XLA_FLAGS', ''))")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout.split("\n")
  assert float(out[0]) == 22.0
  measured = xla_cpu._jaxlib_version().startswith(xla_cpu.MEASURED_JAXLIB_SERIES)
  assert out[1].split() == (list(xla_cpu.TUNED_FLAGS) if measured else [])
