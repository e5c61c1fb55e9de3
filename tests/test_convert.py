"""Loading torchvision-layout state dicts (.npz, .safetensors, .pth) into Flax variables; the CLI."""

import json
import sys

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
  with pytest.raises(convert.StateDictError, match="(?i)cannot read"):
    convert.load_npz_state_dict(str(corrupt))


def test_torch_name_maps_trailing_index_groups():
  assert convert.torch_name("params", ("layer1_0", "downsample_1", "scale")) == \
      "layer1.0.downsample.1.weight"
  assert convert.torch_name("batch_stats", ("features_1_0", "block_0_1", "var")) == \
      "features.1.0.block.0.1.running_var"
  assert convert.torch_name("params", ("stage2_0", "branch1_0", "kernel")) == \
      "stage2.0.branch1.0.weight"


def write_safetensors(path, tensors: dict, header_extra: dict | None = None, pad: int = 0):
  """A minimal safetensors writer (the format, not the library): u64 LE header size, JSON, data."""
  codes = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64"}
  header, chunks, offset = dict(header_extra or {}), [], 0
  for name, (value, code) in tensors.items():
    raw = np.ascontiguousarray(value).tobytes()
    header[name] = {"dtype": code or codes[value.dtype], "shape": list(value.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  blob = json.dumps(header).encode() + b" " * pad
  path.write_bytes(len(blob).to_bytes(8, "little") + blob + b"".join(chunks))


def test_safetensors_round_trip_with_f16_bf16_and_ignored_buffers(convnet_state_dict, tmp_path):
  _, template, sd = convnet_state_dict
  path = tmp_path / "sd.safetensors"
  as_bf16 = lambda v: (v.view(np.uint32) >> 16).astype("<u2")  # truncation: exact in bf16
  tensors = {k: (v, None) for k, v in sd.items()}
  tensors["features.0.weight"] = (sd["features.0.weight"].astype(np.float16), None)
  tensors["classifier.weight"] = (as_bf16(sd["classifier.weight"]), "BF16")
  tensors["module.features.1.num_batches_tracked"] = (np.array(7, np.int64), None)
  write_safetensors(path, tensors, {"__metadata__": {"format": "pt"}}, pad=5)
  loaded = convert.load_state_dict(str(path))
  np.testing.assert_array_equal(loaded["features.4.weight"], sd["features.4.weight"])
  np.testing.assert_array_equal(loaded["features.0.weight"],
                                sd["features.0.weight"].astype(np.float16))
  bf16 = (as_bf16(sd["classifier.weight"]).astype(np.uint32) << 16).view(np.float32)
  np.testing.assert_array_equal(loaded["classifier.weight"], bf16)
  assert loaded["classifier.weight"].dtype == np.float32
  variables = convert.state_dict_to_variables(loaded, template)
  np.testing.assert_array_equal(variables["batch_stats"]["features_1"]["var"],
                                sd["features.1.running_var"])


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:5], "shorter than"),
    (lambda b: (10**9).to_bytes(8, "little") + b[8:], "exceeds the file size"),
    (lambda b: b[:8] + b"x" + b[9:], "not JSON"),
    (lambda b: b[:-4], "data_offsets"),
])
def test_corrupt_safetensors_is_a_clear_error(tmp_path, damage, message):
  path = tmp_path / "x.safetensors"
  write_safetensors(path, {"w": (np.ones((2, 3), np.float32), None)})
  path.write_bytes(damage(path.read_bytes()))
  with pytest.raises(convert.StateDictError, match=f"Cannot read safetensors file .*{message}"):
    convert.load_state_dict(str(path))


def test_pth_without_torch_names_the_alternatives(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  with pytest.raises(convert.StateDictError, match=r"needs torch .*\.safetensors"):
    convert.load_state_dict(str(tmp_path / "x.pth"))
  with pytest.raises(convert.StateDictError, match="Unsupported state dict format"):
    convert.load_state_dict(str(tmp_path / "x.bin"))


def test_cli_writes_a_verified_npz(convnet_state_dict, tmp_path, capsys):
  model, template, sd = convnet_state_dict
  src, out = tmp_path / "in.safetensors", tmp_path / "out.npz"
  write_safetensors(src, {**{"module." + k: (v, None) for k, v in sd.items()}})
  assert convert.main(["--model=convnet", "--num_classes=10", f"--input={src}",
                       f"--output={out}"]) == 0
  assert "verified" in capsys.readouterr().out
  back = convert.load_state_dict(str(out))  # what --config.teacher.checkpoint reads
  assert set(back) == set(sd)
  variables = convert.state_dict_to_variables(back, template)
  np.testing.assert_array_equal(variables["params"]["classifier"]["kernel"],
                                sd["classifier.weight"].T)


@pytest.mark.parametrize("args,message", [
    (["--model=convnet", "--num_classes=100"], "classifier.weight: checkpoint (10, 2048) vs model"),
    (["--model=resnet18", "--num_classes=10"], "none of the checkpoint's 20 tensors"),
    (["--model=resnet19", "--num_classes=10"], "Unknown model 'resnet19'"),
    (["--model=convnet", "--num_classes=10", "--input=nope.npz"], "not found: nope.npz"),
    (["--model=convnet", "--num_classes=ten"], "invalid int value: 'ten'"),
    (["--model=convnet", "--num_classes=10", "--output=x.pth"], "--output must end in .npz"),
])
def test_cli_bad_input_is_one_line_and_status_2(convnet_state_dict, tmp_path, capsys, monkeypatch,
                                                args, message):
  _, _, sd = convnet_state_dict
  monkeypatch.chdir(tmp_path)
  np.savez(tmp_path / "in.npz", **sd)
  defaults = {"--input": "--input=in.npz", "--output": "--output=out.npz"}
  args = args + [v for k, v in defaults.items() if not any(a.startswith(k) for a in args)]
  try:
    status = convert.main(args)
  except SystemExit as e:  # argparse errors
    status = e.code
  err = capsys.readouterr().err
  assert status == 2 and message in err
  assert err.count("\n") == 1 and err.startswith("dwa_jax: error: ")
  assert not (tmp_path / "out.npz").exists()


def test_a_squeeze_workdir_exports_and_imports_back(tmp_path, capsys):
  """Our own trained teacher, exported from its workdir into the .npz that
  --config.teacher.checkpoint imports: the imported teacher is the same network."""
  from dwa_jax import main as main_lib, teacher_store
  from dwa_jax.testing import tiny_config as tiny  # pylint: disable=g-import-not-at-top
  trained = tmp_path / "trained"
  c = tiny()
  c.stage = "squeeze"
  assert main_lib.execute(c, trained) == 0
  out = tmp_path / "teacher.npz"
  assert convert.main(["--model=convnet", "--num_classes=10", f"--input={trained}",
                       "--image_size=8", "--channels=1", f"--output={out}"]) == 0
  imported = tmp_path / "imported"
  c.teacher.checkpoint = str(out)
  assert main_lib.execute(c, imported) == 0
  (_, a, meta_a), (_, b, meta_b) = (teacher_store.load_teacher(trained),
                                    teacher_store.load_teacher(imported))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert meta_b["test_accuracy"] == meta_a["test_accuracy"]
  # A later stage on a fresh workdir imports the named checkpoint itself, once.
  fresh = tmp_path / "fresh"
  c.stage = "recover"
  capsys.readouterr()
  assert main_lib.execute(c, fresh) == 0
  assert "imported from" in capsys.readouterr().out
  _, d, meta_d = teacher_store.load_teacher(fresh)
  jax.tree.map(np.testing.assert_array_equal, a, d)
  assert (fresh / "synthetic" / "dwa" / "manifest.json").exists()
  c.stage = "relabel"
  assert main_lib.execute(c, fresh) == 0
  assert "imported from" not in capsys.readouterr().out  # the workdir's import is reused
  (tmp_path / "empty").mkdir()
  with pytest.raises(convert.StateDictError, match="No complete teacher checkpoint"):
    convert.load_state_dict(str(tmp_path / "empty"))
