"""Data sources. Each returns an in-memory `Dataset` of uint8 NHWC images and int32 labels.

`load_dataset(name, split, data_dir)` understands:
  digits                 scikit-learn's embedded 8x8 digits (the default; no download)
  cifar10, cifar100      tensorflow-datasets via `tfds.data_source` (no TensorFlow needed)
  imagenet2012           tfds data_source, decoded lazily (resize 256, centre crop 224)
  tiny_imagenet          the Tiny-ImageNet-200 folder in `data_dir`
  npz:PATH               a .npz with `images` (uint8 NHWC) and `labels`
  folder:PATH            an ImageFolder: PATH/<class name>/*.png|jpg
  cifar10_jpeg:PATH      the JPEG-bytes CIFAR-10 file of ../shared/data (decoded once, cached)
"""

import dataclasses
import functools
import io
import os
import pathlib
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm import auto as tqdm

NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "tiny_imagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DataError(ValueError):
  """A data set cannot be found or read."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  images: Any              # uint8 (N, H, W, C): a numpy array or a lazily decoding equivalent
  labels: np.ndarray       # int32 (N,)
  num_classes: int
  class_names: tuple
  mean: tuple              # per channel, pixel units in [0, 1]
  std: tuple
  name: str


def _stats(images: np.ndarray) -> tuple[tuple, tuple]:
  x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
  return tuple(float(v) for v in x.mean(0)), tuple(float(v) for v in x.std(0))


def _make(images, labels, class_names, name, mean_std=None) -> Dataset:
  labels = np.asarray(labels, np.int32)
  if len(images) != len(labels):
    raise DataError(f"{name}: {len(images)} images but {len(labels)} labels.")
  if len(labels) == 0:
    raise DataError(f"{name}: no images found.")
  mean, std = mean_std or _stats(np.asarray(images))
  return Dataset(images, labels, len(class_names), tuple(class_names), tuple(mean), tuple(std),
                 name)


# ----------------------------------------------------------------------------- digits

def digits_split(labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0):
  """Stratified split: per class, a default_rng(seed) permutation; its first 20% is test."""
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_test = int(round(test_fraction * len(idx)))
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits(split: str) -> Dataset:
  """scikit-learn's embedded digits: 1,797 8x8 grayscale images (values 0-16 -> 0-255)."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  bunch = datasets.load_digits()
  images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = bunch.target.astype(np.int32)
  train_idx, test_idx = digits_split(labels)
  mean_std = _stats(images[train_idx])  # train statistics for both splits
  idx = {"train": train_idx, "test": test_idx}[_check_split(split)]
  return _make(images[idx], labels[idx], [str(c) for c in range(10)], "digits", mean_std)


def _check_split(split: str) -> str:
  if split not in ("train", "test"):
    raise DataError(f"split must be 'train' or 'test', got {split!r}.")
  return split


# ----------------------------------------------------------------------------- tfds

def _tfds_source(name: str, split: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds_split = {"test": "validation" if name == "imagenet2012" else "test"}.get(split, split)
  try:
    source = tfds.data_source(name, split=tfds_split, data_dir=data_dir or None)
    info = tfds.builder(name, data_dir=data_dir or None).info
  except Exception as e:  # tfds raises assorted types for data that is not prepared
    raise DataError(f"tfds data set {name!r} ({tfds_split}) is not available in "
                    f"{data_dir or 'the default tfds data_dir'}: {type(e).__name__}: {e}. Prepare "
                    "it with `tfds build` on a machine with internet, or pass --config.data_dir.")
  return source, info.features["label"].names


def load_tfds(name: str, split: str, data_dir: str | None = None) -> Dataset:
  """CIFAR-10/100 read fully into memory through `tfds.data_source` (random access)."""
  source, class_names = _tfds_source(name, _check_split(split), data_dir)
  n = len(source)
  first = np.asarray(source[0]["image"])
  images = np.empty((n, *first.shape), np.uint8)
  labels = np.empty((n,), np.int32)
  for i in tqdm.trange(n, desc=f"reading {name} {split}", unit="img", mininterval=2):
    record = source[i]
    images[i], labels[i] = record["image"], record["label"]
  return _make(images, labels, class_names, name, NORMALISATION.get(name))


class LazyImages:
  """Decodes a tfds data source on demand (resize shorter side to 256, centre crop 224), so
  ImageNet never has to fit in memory. Indexable with ints, slices and integer arrays."""

  def __init__(self, source, size: int = 224, resize: int = 256):
    self.source, self.size, self.resize = source, size, resize
    self.shape = (len(source), size, size, 3)
    self.dtype = np.uint8

  def __len__(self):
    return self.shape[0]

  def _decode(self, i: int) -> np.ndarray:
    image = Image.fromarray(np.asarray(self.source[int(i)]["image"])).convert("RGB")
    scale = self.resize / min(image.size)
    image = image.resize((max(self.resize, round(image.width * scale)),
                          max(self.resize, round(image.height * scale))), Image.BILINEAR)
    left, top = (image.width - self.size) // 2, (image.height - self.size) // 2
    return np.asarray(image.crop((left, top, left + self.size, top + self.size)))

  def __getitem__(self, index):
    idx = np.arange(len(self))[index]
    if np.ndim(idx) == 0:
      return self._decode(idx)
    return np.stack([self._decode(i) for i in np.ravel(idx)]).reshape(*np.shape(idx), *self.shape[1:])


def load_tfds_lazy(name: str, split: str, data_dir: str | None = None) -> Dataset:
  source, class_names = _tfds_source(name, _check_split(split), data_dir)
  labels = np.fromiter((source[i]["label"] for i in tqdm.trange(
      len(source), desc=f"reading {name} {split} labels", unit="img", mininterval=2)),
      np.int32, len(source))
  return _make(LazyImages(source), labels, class_names, name, NORMALISATION[name])


# ----------------------------------------------------------------------------- files

def _read_image(path: pathlib.Path, size: int | None, mode: str) -> np.ndarray:
  try:
    with Image.open(path) as image:
      image = image.convert(mode)
      if size and image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
      array = np.asarray(image)
  except OSError as e:
    raise DataError(f"Cannot decode image {path}: {e}") from None
  return array[..., None] if array.ndim == 2 else array


def load_image_folder(root, image_size: int | None = None, mode: str = "RGB",
                      class_names: Sequence[str] | None = None, name: str | None = None,
                      mean_std=None) -> Dataset:
  """ImageFolder layout `root/<class>/*.png|jpg`, classes sorted by folder name."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise DataError(f"Image folder not found: {root}")
  class_names = list(class_names or sorted(p.name for p in root.iterdir() if p.is_dir()))
  if not class_names:
    raise DataError(f"No class sub-folders in {root} (expected {root}/<class>/<image>.png).")
  paths, labels = [], []
  for label, cls in enumerate(class_names):
    found = sorted(p for p in (root / cls).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    paths += found
    labels += [label] * len(found)
  if not paths:
    raise DataError(f"No .png/.jpg images under {root}.")
  images = np.stack([_read_image(p, image_size, mode) for p in tqdm.tqdm(
      paths, desc=f"reading {root.name}", unit="img", mininterval=2)])
  return _make(images, labels, class_names, name or f"folder:{root}", mean_std)


def load_tiny_imagenet(root, split: str) -> Dataset:
  """Tiny-ImageNet-200: wnids.txt, train/<wnid>/images/*.JPEG, val/images + val_annotations.txt."""
  root = pathlib.Path(root or "")
  if not (root / "wnids.txt").exists():
    raise DataError(f"Tiny-ImageNet not found: {root / 'wnids.txt'} is missing; set "
                    "--config.data_dir to the tiny-imagenet-200 folder.")
  wnids = (root / "wnids.txt").read_text().split()
  if _check_split(split) == "train":
    return load_image_folder(root / "train", 64, class_names=wnids, name="tiny_imagenet",
                             mean_std=NORMALISATION["tiny_imagenet"])
  annotations = (root / "val" / "val_annotations.txt").read_text().splitlines()
  index = {w: i for i, w in enumerate(wnids)}
  rows = [line.split("\t")[:2] for line in annotations if line.strip()]
  images = np.stack([_read_image(root / "val" / "images" / f, 64, "RGB") for f, _ in rows])
  return _make(images, [index[w] for _, w in rows], wnids, "tiny_imagenet",
               NORMALISATION["tiny_imagenet"])


def load_npz(path, split: str | None = None) -> Dataset:
  """A .npz with `images` (uint8 NHWC) and `labels`; optional `class_names`, `mean`, `std`.
  `{split}_images`/`{split}_labels` are used instead when present."""
  path = pathlib.Path(path)
  if not path.exists():
    raise DataError(f"npz data file not found: {path}")
  with np.load(path, allow_pickle=False) as f:
    prefix = f"{split}_" if split and f"{split}_images" in f.files else ""
    if f"{prefix}images" not in f.files or f"{prefix}labels" not in f.files:
      raise DataError(f"{path} needs arrays 'images' and 'labels' (found {sorted(f.files)}).")
    images, labels = f[f"{prefix}images"], f[f"{prefix}labels"]
    names = [str(s) for s in f["class_names"]] if "class_names" in f.files else None
    mean_std = (tuple(f["mean"]), tuple(f["std"])) if "mean" in f.files else None
  if images.dtype != np.uint8 or images.ndim != 4:
    raise DataError(f"{path}: images must be uint8 (N, H, W, C), got {images.dtype} "
                    f"{images.shape}.")
  names = names or [str(c) for c in range(int(labels.max()) + 1)]
  return _make(images, labels, names, f"npz:{path}", mean_std)


def load_cifar10_jpeg(path, split: str, cache_dir=None) -> Dataset:
  """The JPEG-bytes CIFAR-10 file (keys {split}_jpeg, {split}_offsets, {split}_labels,
  class_names); decoded once with PIL and cached as .npy beside `cache_dir`."""
  path = pathlib.Path(path)
  if not path.exists():
    raise DataError(f"CIFAR-10 JPEG file not found: {path}")
  cache = pathlib.Path(cache_dir or os.environ.get("DWA_CACHE_DIR", "~/.cache/dwa_jax")).expanduser()
  stat = path.stat()
  cached = cache / f"{path.stem}_{stat.st_size}_{_check_split(split)}.npz"
  with np.load(path, allow_pickle=False) as f:
    labels = f[f"{split}_labels"].astype(np.int32)
    class_names = [str(s) for s in f["class_names"]]
    if cached.exists():
      with np.load(cached) as c:
        images = c["images"]
    else:
      blob, offsets = f[f"{split}_jpeg"], f[f"{split}_offsets"]
      images = np.stack([
          np.asarray(Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
          for i in tqdm.trange(len(labels), desc=f"decoding cifar10 {split}", unit="img",
                               mininterval=2)])
      from dwa_jax import files  # pylint: disable=g-import-not-at-top
      files.save_npz(cached, images=images)
  return _make(images, labels, class_names, "cifar10", NORMALISATION["cifar10"])


# ----------------------------------------------------------------------------- dispatch

@functools.lru_cache(maxsize=8)
def load_dataset(name: str, split: str, data_dir: str | None = None) -> Dataset:
  """See the module docstring. Cached per process: stages share one decoded copy."""
  kind, _, arg = name.partition(":")
  if kind == "digits":
    return load_digits(split)
  if kind in ("cifar10", "cifar100") and not arg:
    return load_tfds(kind, split, data_dir)
  if kind == "imagenet2012":
    return load_tfds_lazy(kind, split, data_dir)
  if kind == "tiny_imagenet":
    return load_tiny_imagenet(data_dir, split)
  if kind == "npz":
    return load_npz(arg, split)
  if kind == "folder":
    root = pathlib.Path(arg)
    return load_image_folder(root / split if (root / split).is_dir() else root)
  if kind == "cifar10_jpeg":
    return load_cifar10_jpeg(arg, split, data_dir or None)
  raise DataError(f"Unknown data set {name!r}; use digits, cifar10, cifar100, imagenet2012, "
                  "tiny_imagenet, npz:PATH, folder:PATH or cifar10_jpeg:PATH.")


def sample_per_class(dataset: Dataset, per_class: int, seed: int) -> np.ndarray:
  """(per_class, num_classes) training-image indices: row i holds one image of each class, in
  class order. Rule: for each class c, the first `per_class` entries of
  default_rng([seed, c]).permutation(indices of class c, ascending)."""
  out = np.empty((per_class, dataset.num_classes), np.int64)
  for c in range(dataset.num_classes):
    members = np.flatnonzero(dataset.labels == c)
    if len(members) < per_class:
      raise DataError(f"{dataset.name}: class {c} has {len(members)} images, fewer than the "
                      f"{per_class} requested per class.")
    out[:, c] = np.random.default_rng([seed, c]).permutation(members)[:per_class]
  return out
