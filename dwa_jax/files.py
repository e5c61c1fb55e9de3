"""Files the pipeline reads and writes: atomic writes, JSON, npz, hashes, and read failures
turned into one clear error (errors.InputError).

Every path under the work directory goes through `etils.epath`, so a `gs://` (or `s3://`)
workdir works; what atomic means on object stores (no rename, no append) is in
docs/scale-out.md ("Cloud work directories").
"""

import contextlib
import hashlib
import json
import os
import pathlib
import tempfile
import zipfile
from typing import Any, Iterator

import numpy as np
from etils import epath

from dwa_jax.errors import InputError, describe_error

# Path prefixes of object stores (etils.epath): no rename, no append, no flock.
REMOTE_PREFIXES = ("gs://", "s3://", "az://", "hf://")


def as_path(path) -> epath.Path:
  """A work-directory path: local, or `gs://...` and the other stores of etils.epath."""
  return epath.Path(path)


def is_remote(path) -> bool:
  return os.fspath(path).startswith(REMOTE_PREFIXES)


def absolute(path) -> epath.Path:
  """`path` made absolute (Orbax requires it); object-store paths already are."""
  path = as_path(path)
  return path if is_remote(path) else path.absolute()


def local_copy(path, digest: str) -> pathlib.Path:
  """`path` itself when local; an object-store file downloaded once into the local temporary
  folder (named by its sha256 `digest`), so it can be read row by row (data.NpyRows)."""
  if not is_remote(path):
    return pathlib.Path(path)
  cached = pathlib.Path(tempfile.gettempdir()) / "dwa_jax_cache" / f"{digest}{as_path(path).suffix}"
  if not cached.exists():
    with atomic_path(cached) as tmp:
      as_path(path).copy(epath.Path(tmp), overwrite=True)
  return cached


@contextlib.contextmanager
def open_npz(path) -> Iterator[Any]:
  """np.load of an .npz anywhere epath reads (local or object store)."""
  with as_path(path).open("rb") as f, np.load(f, allow_pickle=False) as npz:
    yield npz


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a local temporary path; only on success it becomes `path`: renamed over it (local,
  the same folder), or uploaded to it as one object (object stores)."""
  path = as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  remote = is_remote(path)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                             dir=None if remote else os.fspath(path.parent))
  os.close(fd)
  tmp = pathlib.Path(tmp)
  try:
    yield tmp
    if remote:
      epath.Path(tmp).copy(path, overwrite=True)
    else:
      os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def reading(path, what: str, hint: str = "", error: type = InputError):
  """Any failure to read `path` (truncated, random bytes, wrong layout: whatever the parsing
  library raises) becomes one `error` (an InputError) naming the file and what it was meant to
  be. An InputError raised inside (already naming the file) passes through unchanged."""
  try:
    yield
  except InputError:
    raise
  except FileNotFoundError:
    raise error(f"{what} not found: {os.fspath(path)}{hint}") from None
  except Exception as e:  # pylint: disable=broad-except  (each parser raises its own types)
    if "pickle" in str(e).lower():
      # numpy's advice for a file that is not .npy/.npz is to unpickle it: never pass that on
      # (unpickling an untrusted file runs its code).
      raise error(f"cannot read {what} {os.fspath(path)}: not a NumPy .npz/.npy file (it starts "
                  f"with neither a zip archive's nor an .npy header's bytes){hint}") from None
    raise error(f"cannot read {what} {os.fspath(path)}: {describe_error(e)}{hint}") from None


def remove_tree(path) -> None:
  """Deletes a folder and everything in it, if it exists (local or object store)."""
  path = as_path(path)
  if path.exists():
    path.rmtree(missing_ok=True)


@contextlib.contextmanager
def staged_dir(path) -> Iterator[epath.Path]:
  """Yields an empty folder beside `path`; on success it replaces `path` (two renames: the old
  folder is moved aside first, then deleted), on failure it is deleted and `path` is untouched.
  On an object store the renames are copies of every object (not atomic; docs/scale-out.md)."""
  path = as_path(path)
  staging = path.parent / f".{path.name}.partial"
  old = path.parent / f".{path.name}.old"
  for leftover in (staging, old):
    remove_tree(leftover)
  staging.mkdir(parents=True)
  try:
    yield staging
    if path.exists():
      path.rename(old)
    staging.rename(path)
    remove_tree(old)
  finally:
    remove_tree(staging)


def write_bytes(path, data: bytes) -> None:
  with atomic_path(path) as tmp:
    tmp.write_bytes(data)


def write_json(path, obj: Any) -> None:
  write_bytes(path, (json.dumps(obj, indent=1, default=json_default) + "\n").encode())


def as_json(obj: Any) -> Any:
  """`obj` as it reads back from JSON (tuples become lists, numpy numbers builtins): what a
  stamp written with write_json is compared against."""
  return json.loads(json.dumps(obj, default=json_default))


def read_json(path, what: str = "JSON file", hint: str = "", keys: tuple = ()) -> Any:
  """A JSON object from `path`; damaged (not JSON, not an object, without one of `keys`) is an
  InputError naming the file."""
  with reading(path, what, hint):
    obj = json.loads(as_path(path).read_bytes().decode("utf-8"))
  if not isinstance(obj, dict):
    raise InputError(f"{what} {os.fspath(path)} holds a JSON {type(obj).__name__}, not an "
                     f"object{hint}")
  missing = [k for k in keys if k not in obj]
  if missing:
    raise InputError(f"{what} {os.fspath(path)} lacks {', '.join(missing)}{hint}")
  return obj


def save_npz(path, **arrays) -> None:
  """np.savez (uncompressed) written straight to a temporary file and renamed: no in-memory
  copy of the arrays, and the rows stay readable one by one (data.NpyRows)."""
  with atomic_path(path) as tmp, tmp.open("wb") as f:
    np.savez(f, **arrays)


class NpzWriter:
  """Writes an uncompressed .npz whose arrays may be streamed in rows, so a set larger than
  memory can be saved batch by batch; atomic: the file appears only on a clean close.

    with NpzWriter(path) as npz:
      with npz.rows("images", (n, h, w, c), np.float32) as write:
        for batch in ...: write(batch)
      npz.add("labels", labels)
  """

  def __init__(self, path):
    self._atomic = atomic_path(path)

  def __enter__(self) -> "NpzWriter":
    tmp = self._atomic.__enter__()
    self._zip = zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
    return self

  def __exit__(self, *exc) -> bool:
    self._zip.close()
    return bool(self._atomic.__exit__(*exc))

  def add(self, name: str, array) -> None:
    with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
      np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)

  @contextlib.contextmanager
  def rows(self, name: str, shape: tuple, dtype) -> Iterator:
    """Yields `write(rows)`; exactly shape[0] rows must be written, in order."""
    dtype, count = np.dtype(dtype), [0]
    with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
      np.lib.format.write_array_header_2_0(
          f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": tuple(shape)})

      def write(rows) -> None:
        rows = np.ascontiguousarray(rows, dtype)
        if rows.shape[1:] != tuple(shape[1:]) or count[0] + len(rows) > shape[0]:
          raise ValueError(f"{name}: rows of shape {rows.shape} do not fit {shape} after "
                           f"{count[0]} rows.")
        f.write(rows.tobytes())
        count[0] += len(rows)

      yield write
      if count[0] != shape[0]:
        raise ValueError(f"{name}: {count[0]} rows written, {shape[0]} declared.")


def sha256(path, chunk: int = 1 << 24) -> str:
  digest = hashlib.sha256()
  with as_path(path).open("rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      digest.update(block)
  return digest.hexdigest()


def json_default(x):
  if isinstance(x, (np.generic, np.ndarray)) or hasattr(x, "__array__"):
    return np.asarray(x).tolist()
  raise TypeError(f"Not JSON serialisable: {type(x)}")


def tree_digest(tree) -> str:
  """sha256 of a pytree's leaves (a teacher's variables, a student's final state): what was
  saved against another teacher is stale. A replicated array spread over several processes is
  read from this process's copy."""
  import jax  # pylint: disable=g-import-not-at-top
  local = lambda a: (a.addressable_data(0) if isinstance(a, jax.Array)
                     and not a.is_fully_addressable else a)
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(jax.tree.map(local, tree))):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


