"""Live parity with torchvision (needs torch + torchvision: `pip install -e '.[torch]'`).

Each architecture is built by torchvision (weights=None, seeded init), its BatchNorm running
statistics and affine parameters are randomised, and its eval-mode float32 logits are compared
with the Flax model's on the converted state dict: max |difference| < 1e-4 both absolute and
relative to max |logit| (torchvision's classifier inits give logits of only 0.06-0.8 here, so the
relative bound is the stricter one).

  .venv/bin/python -m pytest -q -s -m torch tests/test_torch_parity.py
"""

import jax
import numpy as np
import pytest

from dwa_jax import convert
from dwa_jax.models import build_model
from fixtures import make_torch_fixture as fixture

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytestmark = pytest.mark.torch
TOLERANCE = 1e-4


def torch_reference(name: str, seed: int):
  """(numpy state dict, NCHW input, torch logits) of a randomised torchvision model."""
  torch.manual_seed(seed)
  model = fixture.torch_model(name)
  state_dict = fixture.randomise_bn({k: v.numpy() for k, v in model.state_dict().items()}, seed)
  fixture.load_into_torch(model, state_dict)
  x = fixture.make_input(name, seed)
  with torch.no_grad():
    return state_dict, x, model(torch.from_numpy(x)).numpy()


def flax_logits(name: str, state_dict: dict, x_nchw: np.ndarray) -> np.ndarray:
  x = x_nchw.transpose(0, 2, 3, 1)
  model = build_model(name, fixture.NUM_CLASSES)
  variables = convert.state_dict_to_variables(state_dict, convert.model_template(model, x.shape[1:]))
  return np.asarray(jax.jit(model.apply)(variables, x))


@pytest.mark.parametrize("name", list(fixture.ARCHS))
def test_logits_match_torchvision(name):
  state_dict, x, expected = torch_reference(name, seed=100 + list(fixture.ARCHS).index(name))
  diff = np.abs(flax_logits(name, state_dict, x) - expected).max()
  scale = np.abs(expected).max()
  print(f"\n{name:20s} input {x.shape[2]}x{x.shape[3]}: max |logit diff| {diff:.2e} "
        f"(max |logit| {scale:.3f}, relative {diff / scale:.1e})")
  assert diff < TOLERANCE and diff < TOLERANCE * scale


def test_cli_converts_a_pth_checkpoint(tmp_path):
  # A training checkpoint as people save them: wrapped, DataParallel prefixes, BN counters.
  name = "mobilenet_v2"
  state_dict, x, expected = torch_reference(name, seed=7)
  wrapped = {"epoch": 3, "state_dict": {"module." + k: torch.from_numpy(np.asarray(v))
                                        for k, v in state_dict.items()}}
  torch.save(wrapped, tmp_path / "ckpt.pth")
  out = tmp_path / "out.npz"
  assert convert.main([f"--model={name}", f"--num_classes={fixture.NUM_CLASSES}",
                       f"--input={tmp_path / 'ckpt.pth'}", f"--output={out}",
                       "--image_size=64"]) == 0
  logits = flax_logits(name, convert.load_state_dict(str(out)), x)
  assert np.abs(logits - expected).max() < TOLERANCE


def test_fixture_matches_this_torch():
  """The committed fixture is reproducible with the installed torchvision."""
  with np.load(fixture.FIXTURE) as f:
    for name in ("resnet18_cifar", "shufflenet_v2_x1_0"):
      seed = int(f[f"{name}/seed"])
      model = fixture.load_into_torch(fixture.torch_model(name),
                                      fixture.numpy_state_dict(name, seed))
      with torch.no_grad():
        logits = model(torch.from_numpy(f[f"{name}/input"])).numpy()
      np.testing.assert_allclose(logits, f[f"{name}/logits"], atol=1e-5)
