"""Data sources: a `Dataset` is random-access uint8 NHWC images plus int32 labels, the labels
always read without decoding an image. Small sets are decoded into memory (a numpy array); large
ones stay on disk as an `ImageSource` that decodes one image per read, so the input pipeline
(`dwa_jax.input_pipeline`, grain) can decode them in worker processes.

`load_dataset(name, split, data_dir)` understands:
  digits                 scikit-learn's embedded 8x8 digits (the default; no download)     memory
  cifar10, cifar100      tensorflow-datasets via `tfds.data_source` (ArrayRecord; no TensorFlow
                         needed to read)                                                   memory
  imagenet2012           tfds data_source, JPEGs decoded on read (resize 256, centre 224)  disk
  tiny_imagenet          the Tiny-ImageNet-200 folder in `data_dir` (classes = sorted wnids) disk
  npz:PATH               a .npz with `{split}_images` (uint8 NHWC) and `{split}_labels`, or
                         `images` and `labels` for every split; read row by row when
                         stored uncompressed (np.savez), else loaded                       disk
  folder:PATH            ImageFolders PATH/train/<class>/*.png|jpg and PATH/test/<class>   disk
  cifar10_jpeg:PATH      the JPEG-bytes CIFAR-10 file of ../shared/data (decoded once, cached) memory
"""

import contextlib
import dataclasses
import functools
import hashlib
import io
import os
import pathlib
import subprocess
import sys
import zipfile
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm import auto as tqdm

from dwa_jax import errors, files, xla_cpu

NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "tiny_imagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# tfds sets whose decoded images fit in this many bytes are decoded once into memory (CIFAR:
# 150 MB); larger ones (ImageNet) are decoded on every read, in the input pipeline's workers.
IN_MEMORY_MAX_BYTES = 2 << 30
# Mean/std of a set without published statistics are measured on at most this many images
# (evenly spaced), so opening a large folder does not decode all of it.
STATS_SAMPLE = 10_000
# ...and read in chunks of at most this many bytes, so checking a set never holds all of it.
CHECK_CHUNK_BYTES = 16 << 20


class DataError(errors.InputError):
  """A data set cannot be found or read."""


class NotRowReadable(DataError):
  """An .npy member that is compressed or Fortran-ordered: loaded whole instead of row by row."""


# ----------------------------------------------------------------------------- random access

class ImageSource:
  """Random-access images that are read (decoded) one at a time, so a set never has to fit in
  memory: `len`, `shape` (N, H, W, C), `dtype`, `[i]` -> one (H, W, C) array and `[indices]` ->
  a stacked array. Numpy arrays satisfy the same protocol (the in-memory sets). Instances are
  pickled into grain's worker processes: file handles are opened lazily, once per process."""

  shape: tuple
  dtype: Any

  def __len__(self) -> int:
    return self.shape[0]

  def read(self, i: int) -> np.ndarray:
    raise NotImplementedError

  def __getitem__(self, index):
    idx = np.arange(len(self))[index]
    if np.ndim(idx) == 0:
      return self.read(int(idx))
    flat = [self.read(int(i)) for i in np.ravel(idx)]
    out = np.stack(flat) if flat else np.zeros((0, *self.shape[1:]), self.dtype)
    return out.reshape(*np.shape(idx), *self.shape[1:])

  def __array__(self, dtype=None, copy=None):
    raise TypeError(f"{type(self).__name__} is read lazily; index it instead of converting the "
                    "whole set to an array.")


def _fit(image: Image.Image, size: int | None, resize: int | None) -> Image.Image:
  """`resize` set: shorter side to `resize`, then the centre `size` crop (the ImageNet
  evaluation transform); else a plain resize to size x size when the image differs."""
  if resize:
    scale = resize / min(image.size)
    image = image.resize((max(resize, round(image.width * scale)),
                          max(resize, round(image.height * scale))), Image.BILINEAR)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))
  if size and image.size != (size, size):
    return image.resize((size, size), Image.BILINEAR)
  return image


def decode_image(blob_or_path, size: int | None = None, mode: str = "RGB",
                 resize: int | None = None) -> np.ndarray:
  """Encoded bytes or a file path -> uint8 (H, W, C), fitted as in `_fit`."""
  try:
    with Image.open(io.BytesIO(blob_or_path) if isinstance(blob_or_path, bytes)
                    else blob_or_path) as image:
      array = np.asarray(_fit(image.convert(mode), size, resize))
  except Exception as e:  # pylint: disable=broad-except  (PIL raises OSError, SyntaxError, ...)
    where = "" if isinstance(blob_or_path, bytes) else f" {blob_or_path}"
    raise DataError(f"Cannot decode image{where}: {errors.describe_error(e)}") from None
  return array[..., None] if array.ndim == 2 else array


class FileImages(ImageSource):
  """Image files (PNG/JPEG), decoded on read; `size` resizes them square."""

  def __init__(self, paths: Sequence, size: int | None = None, mode: str = "RGB"):
    self.paths = [str(p) for p in paths]
    self.size, self.mode, self.dtype = size, mode, np.uint8
    self.shape = (len(self.paths), *decode_image(self.paths[0], size, mode).shape)

  def read(self, i: int) -> np.ndarray:
    image = decode_image(self.paths[i], self.size, self.mode)
    if image.shape != self.shape[1:]:
      raise DataError(f"{self.paths[i]} has shape {image.shape}, the set {self.shape[1:]}; pass "
                      "an image size or resize the files.")
    return image


class SubsetImages(ImageSource):
  """Rows `indices` of another source, read through it."""

  def __init__(self, base, indices):
    self.base, self.indices = base, np.asarray(indices, np.int64)
    self.shape, self.dtype = (len(self.indices), *base.shape[1:]), base.dtype

  def read(self, i: int) -> np.ndarray:
    return np.asarray(self.base[int(self.indices[i])])


def _read_npy_header(f):
  """(shape, fortran_order, dtype) of the .npy stream `f`, positioned at its data after."""
  if np.lib.format.read_magic(f) == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  return np.lib.format.read_array_header_2_0(f)


def _npy_layout(path: pathlib.Path, key: str | None):
  """(data offset in the file, dtype, shape) of a .npy file or of an uncompressed (stored)
  .npz member; None for a compressed member, which cannot be read row by row."""
  if key is None:
    with open(path, "rb") as f:
      shape, fortran, dtype = _read_npy_header(f)
      return (None if fortran else f.tell()), dtype, shape
  with zipfile.ZipFile(path) as archive:
    info = archive.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
      return None, None, None
    with archive.open(info) as member:
      shape, fortran, dtype = _read_npy_header(member)
      header = member.tell()
  with open(path, "rb") as f:  # the member's local header: 30 bytes + name + extra field
    f.seek(info.header_offset)
    local = f.read(30)
    name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
  return (None if fortran else info.header_offset + 30 + name_len + extra_len + header), dtype, shape


class NpyRows(ImageSource):
  """Rows of a .npy file or of an uncompressed .npz member, read with pread: nothing is
  mapped, so reading a set does not grow the process's resident memory."""

  def __init__(self, path, key: str | None = None):
    self.path, self.key = pathlib.Path(path), key
    offset, dtype, shape = _npy_layout(self.path, key)
    if offset is None:
      raise NotRowReadable(f"{path}{':' + key if key else ''} is compressed or Fortran-ordered "
                           "and cannot be read row by row.")
    self.offset, self.dtype, self.shape = offset, dtype, tuple(shape)
    self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    self._fd, self._pid = None, None
    needed = offset + (shape[0] if shape else 0) * self.row_bytes
    if self.path.stat().st_size < needed:
      raise DataError(f"{path} is truncated: {self.path.stat().st_size} bytes, its header "
                      f"declares {needed}.")

  def __getstate__(self):
    return {**self.__dict__, "_fd": None, "_pid": None}

  def read(self, i: int) -> np.ndarray:
    if self._pid != os.getpid():  # a fresh process (grain worker): its own descriptor
      self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
    blob = os.pread(self._fd, self.row_bytes, self.offset + i * self.row_bytes)
    return np.frombuffer(blob, self.dtype).reshape(self.shape[1:])


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  images: Any              # (N, H, W, C) uint8 (float32 in [0, 1] for synthetic sets): a numpy
                           # array or an ImageSource
  labels: np.ndarray       # int32 (N,)
  num_classes: int
  class_names: tuple
  mean: tuple              # per channel, pixel units in [0, 1]
  std: tuple
  name: str


def _sample_chunks(images):
  """At most STATS_SAMPLE evenly spaced images (all of them when there are fewer), yielded as
  arrays of at most CHECK_CHUNK_BYTES: what statistics and checks read, so that neither the number
  of images read nor the memory they take grows with the set."""
  n = len(images)
  idx = np.unique(np.linspace(0, n - 1, min(n, STATS_SAMPLE)).round().astype(np.int64))
  row_bytes = max(1, int(np.prod(images.shape[1:], dtype=np.int64)) * np.dtype(images.dtype).itemsize)
  step = max(1, CHECK_CHUNK_BYTES // row_bytes)
  for start in range(0, len(idx), step):
    yield np.asarray(images[idx[start:start + step]])


def _stats(images) -> tuple[tuple, tuple]:
  """Per-channel mean and std in [0, 1] units over `_sample_chunks` (two passes: the mean, then
  the squared deviations from it)."""
  channels = images.shape[-1]

  def pixels(chunk):
    x = chunk.reshape(-1, channels).astype(np.float64)
    return x / 255.0 if chunk.dtype == np.uint8 else x

  count, total = 0, np.zeros(channels, np.float64)
  for chunk in _sample_chunks(images):
    x = pixels(chunk)
    count, total = count + len(x), total + x.sum(0)
  mean = total / count
  squares = np.zeros(channels, np.float64)
  for chunk in _sample_chunks(images):
    squares += np.square(pixels(chunk) - mean).sum(0)
  return tuple(float(v) for v in mean), tuple(float(v) for v in np.sqrt(squares / count))


def _check_labels(labels: np.ndarray, num_classes: int, name: str) -> None:
  """Integer class indices in [0, num_classes), at least two classes."""
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f"{name}: labels must be integer class indices, one per image; got "
                    f"{labels.dtype} of shape {labels.shape}.")
  if labels.size and labels.min() < 0:
    raise DataError(f"{name}: {int(np.sum(labels < 0))} negative labels (e.g. "
                    f"{int(labels.min())}); labels must be class indices 0..C-1.")
  if num_classes < 2:
    raise DataError(f"{name}: {num_classes} class(es); distillation needs at least 2 classes.")
  if labels.size and labels.max() >= num_classes:
    raise DataError(f"{name}: {int(np.sum(labels >= num_classes))} labels >= the {num_classes} "
                    f"classes (e.g. {int(labels.max())}).")


def _make(images, labels, class_names, name, mean_std=None) -> Dataset:
  labels = np.asarray(labels)
  if len(labels) and labels.dtype == object:  # e.g. a list of Python ints from a folder
    labels = labels.astype(np.int64)
  _check_labels(labels, len(class_names), name)
  labels = labels.astype(np.int32)
  if len(images) != len(labels):
    raise DataError(f"{name}: {len(images)} images but {len(labels)} labels.")
  if len(labels) == 0:
    raise DataError(f"{name}: no images found.")
  mean, std = mean_std or _stats(images)
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

TFDS_PREPARE_HINT = ("prepare it on a machine with internet: pip install 'dwa_jax[prepare]' (adds "
                     "TensorFlow, which tfds needs to prepare data) and `tfds build {name} "
                     "--data_dir=DIR --file_format=array_record`, then copy DIR here and pass "
                     "--config.data_dir=DIR")
TFDS_CONVERT_HINT = ("tfds.data_source reads ArrayRecord only; convert it once with `pip install "
                     "tensorflow && tfds convert_format --dataset_version_dir={path} "
                     "--out_file_format=array_record` (or rebuild it with `tfds build {name} "
                     "--data_dir=DIR --file_format=array_record`)")
TFDS_DEFAULT_DIR = "the default tfds data_dir (~/tensorflow_datasets)"


def default_cache_dir() -> pathlib.Path:
  """Where decoded CIFAR-10 JPEGs and tfds label lists are cached: $DWA_CACHE_DIR, else
  ~/.cache/dwa_jax."""
  return pathlib.Path(os.environ.get("DWA_CACHE_DIR", "~/.cache/dwa_jax")).expanduser()


def _tfds_split(name: str, split: str) -> str:
  return {"test": "validation" if name == "imagenet2012" else "test"}.get(_check_split(split), split)


def _is_download_failure(error: BaseException) -> bool:
  """requests/urllib connection errors and tfds's DownloadError, anywhere in the cause chain."""
  while error is not None:
    names = {c.__name__ for c in type(error).__mro__}
    if names & {"ConnectionError", "DownloadError", "URLError", "Timeout", "SSLError"}:
      return True
    error = error.__cause__ or error.__context__
  return False


def tfds_builder(name: str, data_dir: str | None):
  """The tfds builder of `name` with its data prepared in ArrayRecord, downloading and preparing
  it first when tfds can (CIFAR; ImageNet needs the manual files). Every failure is a DataError
  that says what to do."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"tfds does not know data set {name!r}: {type(e).__name__}: {e}") from None
  if builder.is_prepared():
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
      raise DataError(f"tfds data set {name!r} in {builder.data_dir} is in "
                      f"{builder.info.file_format.value} format; " + TFDS_CONVERT_HINT.format(
                          path=builder.data_dir, name=name))
    return builder
  if name == "imagenet2012":
    raise DataError(f"tfds data set imagenet2012 is not prepared in {data_dir or TFDS_DEFAULT_DIR}"
                    ": put the ILSVRC2012 train/val tars in DIR/downloads/manual and run `tfds "
                    "build imagenet2012 --data_dir=DIR --file_format=array_record` (pip install "
                    "'dwa_jax[prepare]' first), then pass --config.data_dir=DIR.")
  if xla_cpu.accelerator_expected(os.environ):
    _prepare_in_child(name, data_dir)
    return tfds.builder(name, data_dir=data_dir or None)
  return prepare_tfds(name, data_dir)


def _prepare_in_child(name: str, data_dir: str | None) -> None:
  """prepare_tfds in a child process that sees no accelerator: preparing imports TensorFlow,
  which would otherwise take GPU memory (or the TPU chips) from this process's JAX."""
  env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-c", "import sys; from dwa_jax import data; "
       "data.prepare_tfds_main(sys.argv[1], sys.argv[2])", name, data_dir or ""],
      env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    lines = [line for line in proc.stderr.splitlines() if line.startswith(CHILD_ERROR)]
    raise DataError(lines[-1][len(CHILD_ERROR):] if lines else
                    f"preparing tfds data set {name!r} failed in a child process (exit status "
                    f"{proc.returncode}): {proc.stderr.strip()[-500:]}")


CHILD_ERROR = "dwa_jax prepare: "


def prepare_tfds_main(name: str, data_dir: str) -> None:
  """The child of _prepare_in_child: prepares, or prints the DataError and exits 2."""
  try:
    prepare_tfds(name, data_dir or None)
  except DataError as e:
    print(CHILD_ERROR + str(e).replace("\n", " "), file=sys.stderr, flush=True)
    sys.exit(2)


def prepare_tfds(name: str, data_dir: str | None):
  """Downloads `name` and prepares it as ArrayRecord in this process (what tfds.data_source
  does on a first run); every failure a DataError that says what to do."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  where = data_dir or TFDS_DEFAULT_DIR
  hint = TFDS_PREPARE_HINT.format(name=name)
  try:
    builder = tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    if _is_download_failure(e):
      raise DataError(f"tfds could not download {name!r} into {where} (no network?); "
                      f"{hint}") from None
    if isinstance(e, ModuleNotFoundError) and e.name == "tensorflow":
      raise DataError(f"tfds needs TensorFlow to prepare {name!r}: pip install "
                      f"'dwa_jax[prepare]' and run again, or {hint}") from None
    raise DataError(f"tfds could not prepare {name!r} in {where}: {type(e).__name__}: {e}; "
                    f"{hint}") from None
  return builder


class TfdsImages(ImageSource):
  """A tfds ArrayRecord split whose images are decoded here, on read (in the input pipeline's
  workers), from the undecoded bytes tfds returns with SkipDecoding."""

  def __init__(self, builder_dir: str, split: str, size: int | None = None,
               resize: int | None = None, image_shape=None):
    self.builder_dir, self.split, self.size, self.resize = str(builder_dir), split, size, resize
    self.dtype, self._source, self._pid = np.uint8, None, None
    n = len(self.source())
    self.shape = (n, *(image_shape or self.read(0).shape))

  def __getstate__(self):
    return {**self.__dict__, "_source": None, "_pid": None}

  def source(self):
    """tfds's random-access source of this split (one per process)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if self._pid != os.getpid():
      builder = tfds.builder_from_directory(self.builder_dir)
      self._source = builder.as_data_source(
          split=self.split, decoders={"image": tfds.decode.SkipDecoding()})
      self._pid = os.getpid()
    return self._source

  def read(self, i: int) -> np.ndarray:
    try:
      return decode_image(self.source()[i]["image"], self.size, resize=self.resize)
    except Exception as e:  # pylint: disable=broad-except  (a damaged record file)
      raise DataError(f"tfds data set in {self.builder_dir}: {self.split} record {i}: "
                      f"{errors.describe_error(e)}") from None

  def labels(self, chunk: int = 4096, cache: bool = True) -> np.ndarray:
    """Every label, without decoding an image (chunks of records, which ArrayRecord reads in
    parallel, images left as bytes); cached in `default_cache_dir()`, keyed by the split's files."""
    cached = self._label_cache() if cache else None
    if cached is not None and cached.exists():
      with contextlib.suppress(OSError, ValueError):  # unreadable: read the labels again
        labels = np.load(cached)
        if labels.shape == (len(self),):
          return labels
    labels = self._read_labels(chunk)
    if cached is not None:
      with contextlib.suppress(OSError):  # unwritable: only costs the next run the read
        with files.atomic_path(cached) as tmp, tmp.open("wb") as f:
          np.save(f, labels)
    return labels

  def _label_cache(self) -> pathlib.Path | None:
    """The labels' cache file: a digest of this split's files (paths, sizes, mtimes)."""
    split_files = sorted(pathlib.Path(self.builder_dir).glob(f"*-{self.split}.*"))
    if not split_files:
      return None
    digest = hashlib.sha256(self.split.encode())
    for path in split_files:
      stat = path.stat()
      digest.update(f"{path.absolute()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return default_cache_dir() / "labels" / f"{digest.hexdigest()[:32]}.npy"

  def _read_labels(self, chunk: int) -> np.ndarray:
    source, n = self.source(), len(self)
    out = np.empty((n,), np.int32)
    for start in tqdm.trange(0, n, chunk, desc=f"reading {self.split} labels",
                             unit="chunk", mininterval=2, leave=False):
      records = source.__getitems__(list(range(start, min(start + chunk, n))))
      out[start:start + len(records)] = [r["label"] for r in records]
    return out


def load_tfds(name: str, split: str, data_dir: str | None = None) -> Dataset:
  """A tfds image-classification split: in memory when its decoded images fit in
  IN_MEMORY_MAX_BYTES (CIFAR), else decoded on read (ImageNet: resize 256, centre crop 224).
  A damaged data_dir (unreadable metadata or record files) is a DataError naming it."""
  with files.reading(data_dir or TFDS_DEFAULT_DIR, f"tfds data set {name!r} in",
                     f"; rebuild it (`tfds build {name} --data_dir=DIR "
                     "--file_format=array_record`)", error=DataError):
    builder = tfds_builder(name, data_dir)
    tfds_split = _tfds_split(name, split)
    if tfds_split not in builder.info.splits:
      raise DataError(f"tfds data set {name!r} in {builder.data_dir} has no split {tfds_split!r} "
                      f"(has {sorted(builder.info.splits)}).")
    shape = builder.info.features["image"].shape
    crop = {"size": 224, "resize": 256} if name == "imagenet2012" else {}
    images = TfdsImages(builder.data_dir, tfds_split, image_shape=(224, 224, 3) if crop else None,
                        **crop)
    labels = images.labels()
    if None not in shape and len(images) * int(np.prod(shape)) <= IN_MEMORY_MAX_BYTES:
      images = np.stack([images.read(i) for i in tqdm.trange(
          len(images), desc=f"decoding {name} {split}", unit="img", mininterval=2)])
    names = builder.info.features["label"].names
    return _make(images, labels, names, name, NORMALISATION.get(name))


# ----------------------------------------------------------------------------- files

def image_folder_files(root, class_names: Sequence[str] | None = None):
  """(paths, labels, class names) of `root/<class>/**/*.png|jpg`: classes sorted by folder name
  unless given, files sorted within a class. Labels come from the folders: nothing is decoded."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise DataError(f"Image folder not found: {root}")
  class_names = list(class_names or sorted(p.name for p in root.iterdir() if p.is_dir()))
  if not class_names:
    raise DataError(f"No class sub-folders in {root} (expected {root}/<class>/<image>.png).")
  paths, labels = [], []
  for label, cls in enumerate(class_names):
    if not (root / cls).is_dir():  # a given class that this split lacks (a test split)
      continue
    found = sorted(p for p in (root / cls).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    paths += found
    labels += [label] * len(found)
  if not paths:
    raise DataError(f"No .png/.jpg images under {root}.")
  return paths, labels, class_names


def load_image_folder(root, image_size: int | None = None, class_names: Sequence[str] | None = None,
                      name: str | None = None, mean_std=None) -> Dataset:
  """ImageFolder layout `root/<class>/*.png|jpg` (see `image_folder_files`), decoded on read: the
  authors' released synthetic sets (`new{c:03d}/...`) included."""
  paths, labels, class_names = image_folder_files(root, class_names)
  return _make(FileImages(paths, image_size), labels, class_names, name or f"folder:{root}",
               mean_std)


def folder_split(root: pathlib.Path, split: str) -> pathlib.Path:
  """`root/<split>` of a `folder:` data set. A folder without it is refused rather than read for
  both splits, which would test students on their own training images."""
  if not root.is_dir():
    raise DataError(f"Image folder not found: {root}")
  if not (root / split).is_dir():
    raise DataError(f"folder:{root} has no {split}/ sub-folder: a folder data set needs "
                    f"{root}/train/<class>/*.png|jpg and {root}/test/<class>/*.png|jpg (one set "
                    "of images for both would test the students on their training images).")
  return root / split


def load_folder_dataset(root: pathlib.Path, split: str) -> Dataset:
  """One split of `folder:root`; every split takes its class indices from root/train, so a test
  split that lacks a class keeps the others' labels."""
  path = folder_split(root, split)
  if split == "train":
    return load_image_folder(path)
  classes = sorted(p.name for p in folder_split(root, "train").iterdir() if p.is_dir())
  extra = sorted({p.name for p in path.iterdir() if p.is_dir()} - set(classes))
  if extra:
    raise DataError(f"{path} has class folders that {root / 'train'} lacks: "
                    f"{', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''}.")
  return load_image_folder(path, class_names=classes)


def load_tiny_imagenet(root, split: str) -> Dataset:
  """Tiny-ImageNet-200: train/<wnid>/images/*.JPEG, val/images + val_annotations.txt. Classes
  are the sorted wnids (torchvision ImageFolder's order, the authors' code), not wnids.txt's."""
  root = pathlib.Path(root or "")
  if not (root / "wnids.txt").exists():
    raise DataError(f"Tiny-ImageNet not found: {root / 'wnids.txt'} is missing; set "
                    "--config.data_dir to the tiny-imagenet-200 folder.")
  wnids = sorted((root / "wnids.txt").read_text().split())
  norm = NORMALISATION["tiny_imagenet"]
  if _check_split(split) == "train":
    return load_image_folder(root / "train", 64, class_names=wnids, name="tiny_imagenet",
                             mean_std=norm)
  annotations = (root / "val" / "val_annotations.txt").read_text().splitlines()
  index = {w: i for i, w in enumerate(wnids)}
  rows = [line.split("\t")[:2] for line in annotations if line.strip()]
  images = FileImages([root / "val" / "images" / f for f, _ in rows], 64)
  return _make(images, [index[w] for _, w in rows], wnids, "tiny_imagenet", norm)


def load_npz(path, split: str | None = None, allow_float: bool = False) -> Dataset:
  """A .npz with `images` (uint8 NHWC; float in [0, 1] too with `allow_float`, for synthetic
  sets) and `labels`; optional `class_names`, `mean`, `std`. `{split}_images`/`{split}_labels`
  are used instead when present. Images stored uncompressed (np.savez) are read row by row,
  compressed ones loaded; anything damaged is a DataError naming the file."""
  path = pathlib.Path(path)
  with files.reading(path, "npz data file", error=DataError):
    with np.load(path, allow_pickle=False) as f:
      prefix = f"{split}_" if split and f"{split}_images" in f.files else ""
      if f"{prefix}images" not in f.files or f"{prefix}labels" not in f.files:
        raise DataError(f"{path} needs arrays 'images' and 'labels' (found {sorted(f.files)}).")
      labels = f[f"{prefix}labels"]
      names = [str(s) for s in f["class_names"]] if "class_names" in f.files else None
      mean_std = (f["mean"], f["std"]) if "mean" in f.files and "std" in f.files else None
    try:
      images = NpyRows(path, f"{prefix}images")
    except NotRowReadable:
      with np.load(path, allow_pickle=False) as f:
        images = f[f"{prefix}images"]
    floating = allow_float and np.issubdtype(images.dtype, np.floating)
    if len(images.shape) != 4 or not (images.dtype == np.uint8 or floating):
      kinds = "uint8 or float" if allow_float else "uint8"
      raise DataError(f"{path}: images must be {kinds} (N, H, W, C), got {images.dtype} "
                      f"{images.shape}.")
    if floating:
      _check_unit_range(images, path)
    if not np.issubdtype(labels.dtype, np.integer):
      raise DataError(f"{path}: labels must be integer class indices, one per image; got "
                      f"{labels.dtype} of shape {labels.shape}.")
    if mean_std is not None:
      mean_std = _check_mean_std(*mean_std, images.shape[-1], path)
    names = names or [str(c) for c in range(int(labels.max()) + 1 if labels.size else 0)]
    return _make(images, labels, names, f"npz:{path}", mean_std)


def _check_unit_range(images, path) -> None:
  """Float images must be finite and in [0, 1]; checked on `_sample_chunks`."""
  low, high = np.inf, -np.inf
  for chunk in _sample_chunks(images):
    if not np.all(np.isfinite(chunk)):
      raise DataError(f"{path}: images hold NaN or infinite pixels.")
    if chunk.size:
      low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
  if low < 0 or high > 1:
    raise DataError(f"{path}: float images must be in [0, 1], found values in "
                    f"[{low:.3g}, {high:.3g}].")


def _check_mean_std(mean, std, channels: int, path) -> tuple[tuple, tuple]:
  mean, std = np.asarray(mean), np.asarray(std)
  if (mean.shape != (channels,) or std.shape != (channels,) or not np.issubdtype(mean.dtype, np.number)
      or not np.issubdtype(std.dtype, np.number)):
    raise DataError(f"{path}: 'mean' and 'std' must hold one number per channel ({channels}), "
                    f"got {mean.dtype} {mean.shape} and {std.dtype} {std.shape}.")
  if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
    raise DataError(f"{path}: 'mean' must be finite and 'std' finite and > 0, got {mean.tolist()} "
                    f"and {std.tolist()}.")
  return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def load_cifar10_jpeg(path, split: str, cache_dir=None) -> Dataset:
  """The JPEG-bytes CIFAR-10 file (keys {split}_jpeg, {split}_offsets, {split}_labels,
  class_names); decoded once with PIL and cached as .npz in `cache_dir` (an unreadable cache
  is decoded again). Anything damaged in the file is a DataError naming it."""
  path = pathlib.Path(path)
  cache = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
  with files.reading(path, "CIFAR-10 JPEG file", error=DataError):
    # Keyed by the file's contents: an edited or replaced file is decoded again.
    cached = cache / f"{path.stem}_{files.sha256(path)[:16]}_{_check_split(split)}.npz"
    with np.load(path, allow_pickle=False) as f:
      keys = (f"{split}_jpeg", f"{split}_offsets", f"{split}_labels", "class_names")
      missing = [k for k in keys if k not in f.files]
      if missing:
        raise DataError(f"{path} lacks {', '.join(missing)} (found {sorted(f.files)}).")
      labels, offsets = f[f"{split}_labels"], f[f"{split}_offsets"]
      class_names = [str(s) for s in f["class_names"]]
      _check_labels(labels, len(class_names), f"{path} ({split})")
      images = _cached_images(cached, len(labels))
      if images is None:
        images = _decode_jpeg_blob(path, split, f[f"{split}_jpeg"], offsets, len(labels))
        with contextlib.suppress(OSError):  # unwritable: only costs the next run the decoding
          files.save_npz(cached, images=images)
  return _make(images, labels.astype(np.int32), class_names, f"cifar10_jpeg:{path}",
               NORMALISATION["cifar10"])


def _cached_images(cached: pathlib.Path, count: int):
  """The decoded images cached earlier, or None (none, or unreadable: decoded again)."""
  try:
    with np.load(cached, allow_pickle=False) as c:
      images = c["images"]
  except Exception:  # pylint: disable=broad-except
    return None
  return images if images.dtype == np.uint8 and images.ndim == 4 and len(images) == count else None


def _decode_jpeg_blob(path, split: str, blob: np.ndarray, offsets: np.ndarray, count: int):
  """Image i is blob[offsets[i]:offsets[i + 1]]; offsets are checked before decoding."""
  if (blob.ndim != 1 or blob.dtype != np.uint8 or offsets.ndim != 1
      or not np.issubdtype(offsets.dtype, np.integer)):
    raise DataError(f"{path}: {split}_jpeg must be 1-D uint8 bytes and {split}_offsets 1-D "
                    f"integers, got {blob.dtype} {blob.shape} and {offsets.dtype} {offsets.shape}.")
  if len(offsets) != count + 1:
    raise DataError(f"{path}: {len(offsets)} {split}_offsets for {count} labels (needs "
                    f"{count + 1}).")
  if count and (offsets[0] < 0 or np.any(np.diff(offsets) <= 0) or offsets[-1] > len(blob)):
    raise DataError(f"{path}: {split}_offsets must increase from >= 0 to at most the "
                    f"{len(blob)} bytes of {split}_jpeg.")
  images = []
  for i in tqdm.trange(count, desc=f"decoding cifar10 {split}", unit="img", mininterval=2):
    try:
      images.append(decode_image(blob[offsets[i]:offsets[i + 1]].tobytes()))
    except DataError as e:
      raise DataError(f"{path}: {split} image {i}: {e}") from None
  shapes = {im.shape for im in images}
  if len(shapes) > 1:
    raise DataError(f"{path}: {split} images differ in shape ({sorted(shapes)[:3]}).")
  return np.stack(images)


# ----------------------------------------------------------------------------- dispatch

@functools.lru_cache(maxsize=8)
def load_dataset(name: str, split: str, data_dir: str | None = None) -> Dataset:
  """See the module docstring. Cached per process: stages share one decoded copy. A training
  split with a class that has no image is rejected here, with the counts."""
  dataset = _load_dataset(name, split, data_dir)
  if split == "train":
    counts = np.bincount(dataset.labels, minlength=dataset.num_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
      shown = ", ".join(str(c) for c in empty[:10]) + (", ..." if len(empty) > 10 else "")
      raise DataError(f"{dataset.name}: {len(empty)} of {dataset.num_classes} classes have no "
                      f"training images (classes {shown}); images per class range "
                      f"{int(counts.min())}-{int(counts.max())}.")
  return dataset


def _load_dataset(name: str, split: str, data_dir: str | None) -> Dataset:
  kind, _, arg = name.partition(":")
  if kind == "digits":
    return load_digits(split)
  if kind in ("cifar10", "cifar100", "imagenet2012") and not arg:
    return load_tfds(kind, split, data_dir)
  if kind == "tiny_imagenet":
    return load_tiny_imagenet(data_dir, split)
  if kind == "npz":
    return load_npz(arg, split)
  if kind == "folder":
    return load_folder_dataset(pathlib.Path(arg), split)
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
