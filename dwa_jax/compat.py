"""Compatibility with the authors' pipeline: one switch, and each of their quirks alone.

`--config.compat=official` turns on every behaviour of the authors' scripts that differs from
our clean defaults (../shared/SPEC.md, "Quirks of the official code"; the list:
docs/compatibility.md); `clean` (the default) turns them off. Each item is also a config field
of its own (SWITCHES); left unset (None), it follows `compat`, and a value given on the command
line wins.
"""

import io

import ml_collections
from ml_collections.config_dict import placeholder
import numpy as np
from PIL import Image

MODES = ("clean", "official")
# The CIFAR-10 std of the authors' synthesis and validation scripts (their teacher's is the
# true one, data.NORMALISATION['cifar10']).
OFFICIAL_CIFAR10_STD = (0.2023, 0.1994, 0.2010)
OFFICIAL_JPEG_QUALITY = 75  # PIL's default, which their save_images uses

# (section or None for the top level, field): the quirk switches `compat` sets.
SWITCHES = ((None, "compat_cifar10_std"), ("recover", "compat_q1"), ("recover", "compat_q2"),
            ("recover", "compat_jpeg"), ("relabel", "teacher_train_mode"),
            ("relabel", "compat_eval_epochs"))


def _node(config, section):
  return config if section is None else config[section]


def _dotted(section, name: str) -> str:
  return name if section is None else f"{section}.{name}"


def add_fields(c: ml_collections.ConfigDict) -> None:
  """Adds `compat` and the per-quirk switches (unset: follow `compat`) to a base config."""
  c.compat = "clean"
  for section, name in SWITCHES:
    _node(c, section)[name] = placeholder(bool)


def dataset_family(dataset: str) -> str:
  """'cifar10', 'cifar100', 'tiny_imagenet', 'imagenet2012' or 'other' for a config.dataset."""
  kind = dataset.partition(":")[0]
  return {"cifar10_jpeg": "cifar10"}.get(kind, kind if kind in (
      "cifar10", "cifar100", "tiny_imagenet", "imagenet2012") else "other")


def official_value(section, name: str, dataset: str) -> bool:
  """What the authors' script for `dataset` does for one switch."""
  if (section, name) == ("relabel", "teacher_train_mode"):
    return dataset_family(dataset) not in ("tiny_imagenet", "imagenet2012")
  return True


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with every unset switch set from `config.compat`. Idempotent."""
  if config.compat not in MODES:
    raise ValueError(f"compat must be one of {MODES}, got {config.compat!r}")
  out = config.copy_and_resolve_references()
  with out.unlocked():
    for section, name in SWITCHES:
      node = _node(out, section)
      if node.get(name) is None:
        node[name] = out.compat == "official" and official_value(section, name, out.dataset)
  return out


def check_resolved(config: ml_collections.ConfigDict) -> None:
  """Raises TypeError for a config whose switches are unset: the stages take the config
  presets.resolve made, never resolve one themselves."""
  unset = [_dotted(section, name) for section, name in SWITCHES
           if _node(config, section).get(name) is None]
  if unset:
    raise TypeError(f"config not resolved ({', '.join(unset)} unset): pass it through "
                    "dwa_jax.presets.resolve first")


def settings(config: ml_collections.ConfigDict) -> dict:
  """The resolved switches, for results and manifests: {'compat': ..., 'recover.compat_q1': ...}."""
  check_resolved(config)
  return {"compat": config.compat, **{_dotted(section, name): bool(_node(config, section)[name])
                                     for section, name in SWITCHES}}


def pixel_normalisation(config: ml_collections.ConfigDict, teacher_meta: dict):
  """(mean, std) that synthesis and validation normalise pixels with: the teacher's own, except
  on CIFAR-10 with compat_cifar10_std (the authors' scripts' std; the teacher keeps its own)."""
  check_resolved(config)
  mean, std = tuple(teacher_meta["mean"]), tuple(teacher_meta["std"])
  if config.compat_cifar10_std and dataset_family(config.dataset) == "cifar10":
    std = OFFICIAL_CIFAR10_STD
  return mean, std


def official_jpeg_bytes(pixels01: np.ndarray) -> bytes:
  """One HWC image in [0, 1] saved as the authors' save_images does: (x·255).astype(uint8)
  (truncation, not rounding), then a JPEG of PIL's default quality 75."""
  array = (np.asarray(pixels01, np.float32) * 255).astype(np.uint8)
  image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=OFFICIAL_JPEG_QUALITY)
  return buffer.getvalue()


def jpeg_roundtrip(images01: np.ndarray) -> np.ndarray:
  """NHWC images in [0, 1] as the authors' students see them: saved with
  `official_jpeg_bytes`, decoded, back in [0, 1] (float32)."""
  channels = images01.shape[-1]
  return np.stack([decode_jpeg(official_jpeg_bytes(x), channels)
                   for x in images01]).astype(np.float32) / 255.0


def decode_jpeg(blob: bytes, channels: int) -> np.ndarray:
  """uint8 HWC pixels of a JPEG, as the authors' ImageFolder loader reads them."""
  from dwa_jax import data  # pylint: disable=g-import-not-at-top  (data imports nothing of ours)
  return data.decode_image(blob, mode="L" if channels == 1 else "RGB")
