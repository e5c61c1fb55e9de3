"""Loading torchvision-layout state dicts (.npz) into Flax variables."""

import jax
import numpy as np
import pytest

from dwa_jax import convert
from dwa_jax.models import build_model


@pytest.fixture(scope="module")
def convnet_state_dict():
  model = build_model("convnet", 10)
  template = convert.model_template(model, (32, 32, 3))
  rng = np.random.default_rng(0)
  flat = convert.variables_to_state_dict(
      jax.tree.map(lambda l: rng.normal(size=l.shape).astype(np.float32), template))
  return model, template, flat


def test_names_and_layouts(convnet_state_dict):
  _, _, sd = convnet_state_dict
  assert sd["features.0.weight"].shape == (128, 3, 3, 3)     # OIHW
  assert sd["classifier.weight"].shape == (10, 128 * 4 * 4)  # (out, in)
  assert {"features.1.running_mean", "features.9.running_var"} <= set(sd)


def test_round_trip_and_module_prefix(convnet_state_dict, tmp_path):
  model, template, sd = convnet_state_dict
  path = tmp_path / "sd.npz"
  np.savez(path, **{"module." + k: v for k, v in sd.items()},
           **{"module.features.1.num_batches_tracked": np.array(3)})
  variables = convert.state_dict_to_variables(convert.load_npz_state_dict(str(path)), template)
  # HWIO kernel is the transposed OIHW weight.
  np.testing.assert_array_equal(variables["params"]["features_0"]["kernel"],
                                sd["features.0.weight"].transpose(2, 3, 1, 0))
  back = convert.variables_to_state_dict(variables)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  x = np.zeros((1, 32, 32, 3), np.float32)
  assert model.apply(variables, x).shape == (1, 10)


def test_errors_name_every_problem(convnet_state_dict):
  _, template, sd = convnet_state_dict
  bad = dict(sd)
  del bad["features.4.weight"]
  bad["features.0.weight"] = bad["features.0.weight"][:64]
  bad["head.weight"] = np.zeros(3)
  with pytest.raises(convert.StateDictError) as err:
    convert.state_dict_to_variables(bad, template)
  msg = str(err.value)
  assert "missing from checkpoint: features.4.weight" in msg
  assert "features.0.weight: checkpoint (64, 3, 3, 3) vs model (128, 3, 3, 3)" in msg
  assert "not used by the model: head.weight" in msg


def test_class_count_mismatch_is_reported(convnet_state_dict):
  _, _, sd = convnet_state_dict
  template100 = convert.model_template(build_model("convnet", 100), (32, 32, 3))
  with pytest.raises(convert.StateDictError, match=r"classifier.weight: checkpoint \(10, 2048\) vs "
                                                   r"model \(100, 2048\)"):
    convert.state_dict_to_variables(sd, template100)


def test_missing_and_corrupt_files(tmp_path):
  with pytest.raises(convert.StateDictError, match="not found"):
    convert.load_npz_state_dict(str(tmp_path / "nope.npz"))
  corrupt = tmp_path / "corrupt.npz"
  corrupt.write_bytes(b"PK\x03\x04 definitely not a zip")
  with pytest.raises(convert.StateDictError, match="Cannot read"):
    convert.load_npz_state_dict(str(corrupt))
