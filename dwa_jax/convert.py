"""torchvision-layout state dicts <-> Flax variables (naming rule in `dwa_jax.models.layers`)."""

import re
import zipfile
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

# Torch buffers with no Flax counterpart.
IGNORED_SUFFIXES = ("num_batches_tracked",)
_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


class StateDictError(ValueError):
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
  if value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))
  if value.ndim == 2:
    return value.T
  return value


def to_torch_layout(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:
    return np.transpose(value, (3, 2, 0, 1))
  if value.ndim == 2:
    return value.T
  return value


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> dict[str, np.ndarray]:
  """Drops the `module.` prefix DataParallel/DDP checkpoints carry."""
  return {(k[len(prefix):] if k.startswith(prefix) else k): np.asarray(v)
          for k, v in state_dict.items()}


def load_npz_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a state dict saved as `np.savez(path, **{name: array})`."""
  try:
    with np.load(path, allow_pickle=False) as data:
      return strip_prefix({k: data[k] for k in data.files})
  except FileNotFoundError:
    raise StateDictError(f"State dict file not found: {path}") from None
  except (ValueError, OSError, zipfile.BadZipFile) as e:  # corrupt zip or npy member
    raise StateDictError(f"Cannot read state dict {path}: {e}") from None


def state_dict_to_variables(state_dict: Mapping[str, Any], template: Any,
                            dtype: Any = None) -> dict:
  """Fills a Flax variable tree shaped like `template` (e.g. from `jax.eval_shape(model.init, ...)`).

  Raises StateDictError listing every missing, unexpected or mis-shaped tensor.
  """
  state_dict = strip_prefix(state_dict)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(template))
  used, missing, mismatched, out = set(), [], [], {}
  for key, leaf in flat.items():
    collection, *path = key
    name = torch_name(collection, tuple(path))
    if name not in state_dict:
      missing.append(name)
      continue
    used.add(name)
    value = to_flax_layout(np.asarray(state_dict[name]))
    if tuple(value.shape) != tuple(leaf.shape):
      mismatched.append(f"{name}: checkpoint {tuple(to_torch_layout(value).shape)} vs model "
                        f"{tuple(to_torch_layout(np.empty(leaf.shape)).shape)}")
      continue
    out[key] = jnp.asarray(value, dtype=dtype or leaf.dtype)
  unexpected = sorted(k for k in state_dict
                      if k not in used and not k.endswith(IGNORED_SUFFIXES))
  problems = []
  if mismatched:
    problems.append("shape mismatch: " + "; ".join(mismatched))
  if missing:
    problems.append(f"missing from checkpoint: {', '.join(missing)}")
  if unexpected:
    problems.append(f"not used by the model: {', '.join(unexpected)}")
  if problems:
    raise StateDictError("State dict does not fit the model — " + " | ".join(problems))
  return flax.traverse_util.unflatten_dict(out)


def variables_to_state_dict(variables: Any) -> dict[str, np.ndarray]:
  """The inverse of `state_dict_to_variables` (torch layouts, numpy arrays)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  return {torch_name(c, tuple(p)): to_torch_layout(np.asarray(v)) for (c, *p), v in flat.items()}


def model_template(model, image_shape: tuple[int, int, int]) -> Any:
  """Shapes and dtypes of the model's variables, without allocating or computing them."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A torchvision-layout state dict from .npz, or .pth/.pt when torch is installed."""
  if str(path).endswith(".npz"):
    return load_npz_state_dict(path)
  if str(path).endswith((".pth", ".pt")):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise StateDictError(f"Reading {path} needs torch (pip install torch), or convert it to .npz "
                           "with np.savez(out, **{k: v.numpy() for k, v in sd.items()}).") from None
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
      raise StateDictError(f"State dict file not found: {path}") from None
    except Exception as e:  # torch raises many types for bad files
      raise StateDictError(f"Cannot read {path}: {type(e).__name__}: {e}") from None
    for wrapper in ("state_dict", "model"):
      if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
        obj = obj[wrapper]
    return strip_prefix({k: v.detach().cpu().numpy() for k, v in obj.items()
                         if hasattr(v, "detach")})
  raise StateDictError(f"Unsupported state dict format {path!r}: use .npz, .pth or .pt.")
