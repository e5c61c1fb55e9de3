"""torchvision-layout state dicts <-> Flax variables (naming rule in `dwa_jax.models.layers`).

Reads .npz, .safetensors (parsed here with numpy, no extra dependency) and .pth/.pt (torch
imported only then). Command line, writing a verified .npz for `--config.teacher.checkpoint`:

  python -m dwa_jax.convert --model=resnet18 --num_classes=1000 --input=resnet18.pth \
      --output=resnet18.npz
"""

import argparse
import json
import os
import pathlib
import pickle
import re
import sys
from typing import Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dwa_jax import errors, files, teacher_store
from dwa_jax.models import build_model, model_template

# Torch buffers with no Flax counterpart.
IGNORED_SUFFIXES = ("num_batches_tracked",)
_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


class StateDictError(errors.InputError):
  """A state dict does not fit the model it is loaded into."""


def torch_name(collection: str, path: tuple[str, ...]) -> str:
  """('params', ('layer1_0', 'conv1', 'kernel')) -> 'layer1.0.conv1.weight'.

  Trailing `_<int>` groups become `.<int>`: ('features_1_0', 'block_0_1', 'scale') ->
  'features.1.0.block.0.1.weight'.
  """
  *modules, leaf = path
  if (collection, leaf) not in _LEAF_TO_TORCH:
    raise StateDictError(f"No torch name for {collection}/{'/'.join(path)}.")
  parts = [re.sub(r"(?:_\d+)+$", lambda m: m.group(0).replace("_", "."), m) for m in modules]
  return ".".join(parts + [_LEAF_TO_TORCH[(collection, leaf)]])


def to_flax_layout(value: np.ndarray) -> np.ndarray:
  """OIHW conv weights -> HWIO; (out, in) linear weights -> (in, out); vectors unchanged."""
  return np.transpose(value, {4: (2, 3, 1, 0), 2: (1, 0)}.get(value.ndim, range(value.ndim)))


def to_torch_layout(value: np.ndarray) -> np.ndarray:
  """The inverse of `to_flax_layout`."""
  return np.transpose(value, {4: (3, 2, 0, 1), 2: (1, 0)}.get(value.ndim, range(value.ndim)))


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> dict[str, np.ndarray]:
  """Drops the `module.` prefix DataParallel/DDP checkpoints carry."""
  return {(k[len(prefix):] if k.startswith(prefix) else k): np.asarray(v)
          for k, v in state_dict.items()}


def load_npz_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a state dict saved as `np.savez(path, **{name: array})`."""
  if not pathlib.Path(path).exists():
    raise StateDictError(f"State dict file not found: {path}")
  with open(path, "rb") as f:
    if not f.read(4).startswith(b"PK"):  # an .npz is a zip archive
      raise StateDictError(f"{path} is not a .npz state dict (it is not a zip archive); a teacher "
                           "file is a .npz, .safetensors or .pth/.pt state dict")
  with files.reading(path, "state dict", error=StateDictError):  # a damaged zip or npy member
    with np.load(path, allow_pickle=False) as data:
      return strip_prefix({k: data[k] for k in data.files})


def state_dict_to_variables(state_dict: Mapping[str, Any], template: Any,
                            dtype: Any = None) -> dict:
  """Fills a Flax variable tree shaped like `template` (e.g. from `jax.eval_shape(model.init, ...)`).

  Raises StateDictError listing every missing, unexpected or mis-shaped tensor.
  """
  state_dict = strip_prefix(state_dict)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(template))
  used, missing, mismatched, out = set(), [], [], {}
  wrong_dtype, non_finite = [], []
  for key, leaf in flat.items():
    collection, *path = key
    name = torch_name(collection, tuple(path))
    if name not in state_dict:
      missing.append(name)
      continue
    used.add(name)
    value = np.asarray(state_dict[name])
    if not np.issubdtype(value.dtype, np.floating):
      wrong_dtype.append(f"{name}: {value.dtype}")
      continue
    if not np.all(np.isfinite(value)):
      non_finite.append(name)
      continue
    value = to_flax_layout(value)
    if tuple(value.shape) != tuple(leaf.shape):
      mismatched.append(f"{name}: checkpoint {tuple(to_torch_layout(value).shape)} vs model "
                        f"{tuple(to_torch_layout(np.empty(leaf.shape)).shape)}")
      continue
    out[key] = jnp.asarray(value, dtype=dtype or leaf.dtype)
  unexpected = sorted(k for k in state_dict
                      if k not in used and not k.endswith(IGNORED_SUFFIXES))
  problems = [] if used else [f"none of the checkpoint's {len(state_dict)} tensors has a name "
                              "the model uses (wrong architecture?)"]
  for what, names, sep in (("shape mismatch", mismatched, "; "),
                           ("not floating point", wrong_dtype, ", "),
                           ("NaN or infinite values in", non_finite, ", "),
                           ("missing from checkpoint", sorted(missing), ", "),
                           ("not used by the model", unexpected, ", ")):
    if names:
      problems.append(f"{what}: {_some(names, sep)}")
  if problems:
    raise StateDictError("State dict does not fit the model — " + " | ".join(problems))
  return flax.traverse_util.unflatten_dict(out)


def _some(names: list[str], sep: str = ", ", limit: int = 12) -> str:
  """The first `limit` names, so a wrong architecture gives a readable one-line error."""
  more = f"{sep}... ({len(names) - limit} more)" if len(names) > limit else ""
  return sep.join(names[:limit]) + more


def variables_to_state_dict(variables: Any) -> dict[str, np.ndarray]:
  """The inverse of `state_dict_to_variables` (torch layouts, numpy arrays)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  return {torch_name(c, tuple(p)): to_torch_layout(np.asarray(v)) for (c, *p), v in flat.items()}


# safetensors dtype codes -> little-endian numpy dtypes (BF16 is widened to float32 on read).
_SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
    "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}


def parse_safetensors(data: bytes) -> dict[str, np.ndarray]:
  """Decodes the safetensors format: u64 little-endian header size N, N bytes of JSON
  {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw
  little-endian tensor bytes (offsets relative to the end of the header)."""
  if len(data) < 8:
    raise ValueError("file shorter than the 8-byte header length")
  n = int.from_bytes(data[:8], "little")
  if n > len(data) - 8:
    raise ValueError(f"header length {n} exceeds the file size {len(data)}")
  try:
    header = json.loads(data[8:8 + n].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"header is not JSON: {e}") from None
  if not isinstance(header, dict):
    raise ValueError("header is not a JSON object")
  buffer = memoryview(data)[8 + n:]
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (TypeError, KeyError, ValueError):
      raise ValueError(f"bad header entry for {name!r}: {info!r}") from None
    if dtype not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{name}: unsupported dtype {dtype}")
    np_dtype = np.dtype(_SAFETENSORS_DTYPES[dtype])
    size = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
    if not 0 <= begin <= end <= len(buffer) or end - begin != size:
      raise ValueError(f"{name}: data_offsets [{begin}, {end}] do not hold {dtype}{list(shape)} "
                       f"in a {len(buffer)}-byte data section")
    value = np.frombuffer(buffer[begin:end], np_dtype).reshape(shape)
    if dtype == "BF16":  # the upper half of a float32
      value = (value.astype(np.uint32) << 16).view(np.float32)
    out[name] = value.astype(value.dtype.newbyteorder("="))  # native order, writable copy
  return out


def load_safetensors_state_dict(path: str) -> dict[str, np.ndarray]:
  try:
    data = pathlib.Path(path).read_bytes()
  except FileNotFoundError:
    raise StateDictError(f"State dict file not found: {path}") from None
  except OSError as e:
    raise StateDictError(f"Cannot read state dict {path}: {e.strerror}") from None
  try:
    return strip_prefix(parse_safetensors(data))
  except ValueError as e:
    raise StateDictError(f"Cannot read safetensors file {path}: {e}") from None


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """A .pth/.pt state dict (optionally wrapped in {'state_dict': ...} or {'model': ...})."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise StateDictError(f"Reading {path} needs torch (pip install 'dwa_jax[torch]'); or save the "
                         "state dict as .safetensors or as .npz with "
                         "np.savez(out, **{k: v.numpy() for k, v in sd.items()}).") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise StateDictError(f"State dict file not found: {path}") from None
  except pickle.UnpicklingError:
    raise StateDictError(f"Cannot read {path}: torch.load(weights_only=True) refuses it (a pickled "
                         "model or other objects?); save model.state_dict() instead.") from None
  except Exception as e:  # torch raises many types for bad files
    raise StateDictError(f"Cannot read {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
  for wrapper in ("state_dict", "model"):
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
  if not isinstance(obj, dict):
    raise StateDictError(f"{path} holds a {type(obj).__name__}, not a state dict; save "
                         "model.state_dict() instead of the model.")
  # numpy has no bfloat16: widen it (and any other float type numpy lacks) to float32.
  to_numpy = lambda t: (t.float() if t.dtype == torch.bfloat16 else t).detach().cpu().numpy()
  return strip_prefix({k: to_numpy(v) for k, v in obj.items() if isinstance(v, torch.Tensor)})


# State-dict file suffix -> its reader (.pth/.pt need torch).
_READERS = {".npz": load_npz_state_dict, ".safetensors": load_safetensors_state_dict,
            ".pth": load_torch_state_dict, ".pt": load_torch_state_dict}
STATE_DICT_SUFFIXES = tuple(_READERS)


def check_state_dict_file(path: str, field: str) -> None:
  """Raises StateDictError unless `path` (config `field`) is a state-dict file or squeeze
  workdir that exists here, in a format load_state_dict reads."""
  path = str(path)
  if os.path.isdir(path):
    teacher_store.check_teacher(path, field)
    return
  if not path.endswith(STATE_DICT_SUFFIXES):
    raise _unsupported_format(path)
  if not os.path.exists(path):
    raise StateDictError(f"State dict file not found: {path}")
  if not os.access(path, os.R_OK):
    raise StateDictError(f"Cannot read state dict {path}: permission denied")


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A torchvision-layout state dict from .npz, .safetensors, .pth/.pt (needs torch), or a
  squeeze workdir (a folder holding teacher/teacher.json)."""
  path = str(path)
  if os.path.isdir(path):  # export our own teacher into the same .npz an import reads
    try:
      return variables_to_state_dict(teacher_store.load_teacher(path)[1])
    except teacher_store.TeacherError as e:
      raise StateDictError(str(e)) from None
  for suffix, read in _READERS.items():
    if path.endswith(suffix):
      return read(path)
  raise _unsupported_format(path)


def _unsupported_format(path: str) -> StateDictError:
  if not pathlib.Path(path).suffix and not os.path.exists(path):  # a workdir that is not there
    return StateDictError(f"{path} does not exist (expected a state dict file or a squeeze "
                          "workdir)")
  return StateDictError(f"Unsupported state dict format {path!r}: use .npz, .safetensors, .pth, "
                        ".pt or a squeeze workdir.")


def default_image_size(model_name: str) -> int:
  """32 for the CIFAR-stem models and the ConvNet, 224 (ImageNet) otherwise."""
  return 32 if model_name == "convnet" or model_name.endswith("_cifar") else 224


def convert_checkpoint(model_name: str, num_classes: int, input_path: str, output_path: str,
                       image_shape: tuple[int, int, int] | None = None) -> dict:
  """Loads a torchvision state dict into `model_name`, writes it as a verified .npz.

  Verified means: the written file reads back into exactly the same variables, and the model
  runs on a random `image_shape` batch with finite logits of the right shape. Returns a summary.
  """
  if not str(output_path).endswith(".npz"):
    raise StateDictError(f"--output must end in .npz, got {output_path!r}.")
  image_shape = image_shape or (default_image_size(model_name),) * 2 + (3,)
  model = build_model(model_name, num_classes)
  template = model_template(model, image_shape)
  variables = state_dict_to_variables(load_state_dict(input_path), template)
  try:
    files.save_npz(output_path, **variables_to_state_dict(variables))
  except OSError as e:
    raise OSError(f"Cannot write {output_path}: {e.strerror}") from None

  reread = state_dict_to_variables(load_npz_state_dict(output_path), template)
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), variables, reread)
  if not all(jax.tree.leaves(same)):
    raise StateDictError(f"{output_path} does not read back to the converted variables.")
  x = jax.random.normal(jax.random.key(0), (1, *image_shape), jnp.float32)
  logits = np.asarray(jax.jit(model.apply)(reread, x))
  if logits.shape != (1, num_classes) or not np.isfinite(logits).all():
    raise StateDictError(f"{model_name} gives non-finite or mis-shaped logits {logits.shape} "
                         "with the converted weights.")
  n_params = sum(int(np.prod(l.shape)) for l in jax.tree.leaves(variables["params"]))
  return {"model": model_name, "tensors": len(jax.tree.leaves(variables)),
          "parameters": n_params, "image_shape": list(image_shape), "output": str(output_path)}


class _Parser(argparse.ArgumentParser):

  def error(self, message):  # one line and status 2, like the main entry point
    self.exit(2, f"dwa_jax: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m dwa_jax.convert --model=NAME --num_classes=N --input=F --output=OUT.npz`."""
  parser = _Parser(prog="dwa-jax-convert", description=(
      "Convert a torchvision state dict (.pth/.pt, .safetensors or .npz) into a verified .npz "
      "usable as --config.teacher.checkpoint."))
  parser.add_argument("--model", required=True, help="zoo name, e.g. resnet18, mobilenet_v2")
  parser.add_argument("--num_classes", required=True, type=int)
  parser.add_argument("--input", required=True,
                      help="state dict: .pth, .pt, .safetensors, .npz, or a squeeze workdir "
                           "(exports the teacher it trained)")
  parser.add_argument("--output", required=True, help="output .npz (torchvision names/layout)")
  parser.add_argument("--image_size", type=int, default=None,
                      help="side of the verification input (default 32 for convnet/*_cifar, "
                           "else 224); the ConvNet's classifier width depends on it")
  parser.add_argument("--channels", type=int, default=3)
  args = parser.parse_args(argv)
  try:
    size = args.image_size or default_image_size(args.model)
    if size < 1 or args.channels < 1:
      raise ValueError(f"--image_size and --channels must be positive, got {size}, "
                       f"{args.channels}.")
    summary = convert_checkpoint(args.model, args.num_classes, args.input, args.output,
                                 (size, size, args.channels))
  except (ValueError, OSError) as e:  # StateDictError is a ValueError
    print(f"dwa_jax: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {summary['output']}: {summary['model']}, {summary['tensors']} tensors, "
        f"{summary['parameters']:,} parameters; verified (reads back identically, finite logits "
        f"on a {'x'.join(map(str, summary['image_shape']))} input)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
