"""The XLA:CPU defaults applied on `import dwa_jax`: when they apply, and that jaxlib accepts them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dwa_jax import xla_cpu


def apply(monkeypatch, environ, jaxlib="0.10.2", devices=()):
  monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: jaxlib)
  monkeypatch.setattr(xla_cpu, "ACCELERATOR_DEVICE_GLOBS", tuple(devices))
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
      ({}, {"jaxlib": "0.11.0"}),    # not measured: the flag might not exist there
      ({}, {"jaxlib": ""}),
      ({"JAX_PLATFORMS": "cuda"}, {}),            # an accelerator: XLA_FLAGS untouched
      ({"JAX_PLATFORMS": "tpu,cpu"}, {}),
      ({"TPU_NAME": "my-pod"}, {}),
      ({}, {"devices": (__file__,)}),             # stands in for /dev/nvidia0 existing
  ]
  for env, kwargs in cases:
    before = dict(env)
    assert not apply(monkeypatch, env, **kwargs), (env, kwargs)
    assert env == before


def test_cpu_platform_first_still_applies(monkeypatch):
  env = {"JAX_PLATFORMS": "cpu"}
  assert apply(monkeypatch, env, devices=(__file__,))  # JAX_PLATFORMS wins over device nodes
  assert env["XLA_FLAGS"].split() == list(xla_cpu.TUNED_FLAGS)


def test_import_applies_them_and_jax_runs_with_them():
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.OPT_OUT)}
  code = ("import os, dwa_jax, jax, jax.numpy as jnp; "
          "x = jnp.arange(12.).reshape(3, 4); print(float(x.mean(0).sum())); "
          "print(os.environ.get('XLA_FLAGS', ''))")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout.split("\n")
  assert float(out[0]) == 22.0
  assert out[1].split() == (list(xla_cpu.TUNED_FLAGS) if xla_cpu.jaxlib_is_measured() else [])


SYNTHESIS = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from dwa_jax import device_dispatch, synthesis
from dwa_jax.models.convnet import ConvNet
model = ConvNet(4, width=64, depth=2)
variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
cfg = synthesis.SynthesisConfig(iterations=6, adjust_steps=3, jitter=2, lr=0.05)
runner = device_dispatch.GroupRunner(model, variables, (16, 16, 3), (0.5,) * 3, (0.25,) * 3, cfg)
x0 = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
images, m = runner.synthesize(x0, jnp.arange(4), jax.random.key(2),
                              synthesis.draw_jitter_offsets(jax.random.key(3), cfg.iterations,
                                                            cfg.jitter))
np.save(sys.argv[1], np.asarray(images))
print(json.dumps({"ce": np.asarray(m["ce"]).tolist(), "bn": np.asarray(m["bn_terms"]).tolist(),
                  "flags": __import__("os").environ.get("XLA_FLAGS", "")}))
"""


@pytest.mark.skipif(not xla_cpu.jaxlib_is_measured(),
                    reason=f"jaxlib {xla_cpu._jaxlib_version() or '(none)'} is not a release the "
                    "tuned options were measured on, so dwa_jax leaves XLA's stock options on "
                    "and both runs would be stock")
def test_tuned_options_compute_the_same_synthesis(tmp_path):
  """A DWA batch (conv, BN statistics, weight and pixel gradients) with and without them."""
  runs = {}
  for name, opt_out in (("tuned", "1"), ("stock", "0")):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env[xla_cpu.OPT_OUT] = opt_out
    out = subprocess.run([sys.executable, "-c", SYNTHESIS, str(tmp_path / f"{name}.npy")],
                         env=env, capture_output=True, text=True, timeout=300, check=True)
    runs[name] = (json.loads(out.stdout.strip().splitlines()[-1]),
                  np.load(tmp_path / f"{name}.npy"))
  (tuned, tuned_x), (stock, stock_x) = runs["tuned"], runs["stock"]
  assert tuned["flags"] != stock["flags"]
  np.testing.assert_allclose(tuned["ce"], stock["ce"], rtol=1e-4)
  np.testing.assert_allclose(tuned["bn"], stock["bn"], rtol=1e-4)
  np.testing.assert_allclose(tuned_x, stock_x, atol=1e-4)
