"""Files the pipeline writes: atomic writes, JSON-lines metrics, PNG image sets and grids."""

import contextlib
import hashlib
import io
import json
import os
import pathlib
import tempfile
import time
from typing import Any, Iterator

import numpy as np
from PIL import Image


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary path in the same folder; renames it over `path` only on success."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  os.close(fd)
  tmp = pathlib.Path(tmp)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_bytes(path, data: bytes) -> None:
  with atomic_path(path) as tmp:
    tmp.write_bytes(data)


def write_json(path, obj: Any) -> None:
  write_bytes(path, (json.dumps(obj, indent=1, default=_to_builtin) + "\n").encode())


def read_json(path) -> Any:
  return json.loads(pathlib.Path(path).read_text())


def save_npz(path, **arrays) -> None:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  write_bytes(path, buf.getvalue())


def sha256(path) -> str:
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def _to_builtin(x):
  if isinstance(x, (np.generic, np.ndarray)) or hasattr(x, "__array__"):
    return np.asarray(x).tolist()
  raise TypeError(f"Not JSON serialisable: {type(x)}")


class MetricsLog:
  """Appends one JSON object per line (stage, step, wall time, values) to `path`."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)

  def write(self, stage: str, step: int, **values) -> None:
    record = {"stage": stage, "step": int(step), "time": round(time.time(), 3), **values}
    with self.path.open("a") as f:
      f.write(json.dumps(record, default=_to_builtin) + "\n")


def to_uint8(images01: np.ndarray) -> np.ndarray:
  """[0, 1] floats -> uint8, rounded (the official code truncates and then saves JPEG)."""
  return np.clip(np.rint(np.asarray(images01) * 255.0), 0, 255).astype(np.uint8)


def _png_bytes(image_uint8: np.ndarray) -> bytes:
  if image_uint8.shape[-1] == 1:
    image_uint8 = image_uint8[..., 0]
  buf = io.BytesIO()
  Image.fromarray(image_uint8).save(buf, format="PNG")
  return buf.getvalue()


def save_image_folder(root, images01: np.ndarray, labels: np.ndarray) -> list[str]:
  """Writes `root/class{c:03d}/class{c:03d}_id{i:03d}.png` (lossless PNG); returns the files."""
  root = pathlib.Path(root)
  counts: dict[int, int] = {}
  files = []
  for image, label in zip(to_uint8(images01), np.asarray(labels)):
    c = int(label)
    i = counts.get(c, 0)
    counts[c] = i + 1
    rel = f"class{c:03d}/class{c:03d}_id{i:03d}.png"
    write_bytes(root / rel, _png_bytes(image))
    files.append(rel)
  return files


def pixel_statistics(images01: np.ndarray) -> dict:
  """Pixel std of a set in [0, 1], and the fraction of pixels at 0 or 255 in 8 bits."""
  levels = np.rint(np.asarray(images01, np.float64) * 255)
  return {"std": float(np.std(images01, dtype=np.float64)),
          "clipped_fraction": float(np.mean((levels <= 0) | (levels >= 255)))}


def image_grid(images01: np.ndarray, rows: int, cols: int, min_cell: int = 32) -> np.ndarray:
  """Tiles (rows*cols, H, W, C) images row-major, nearest-upscaled so small images stay visible."""
  images = to_uint8(images01)
  n, h, w, c = images.shape
  scale = max(1, -(-min_cell // max(h, w)))
  images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  h, w, pad = h * scale, w * scale, 2
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for k in range(min(n, rows * cols)):
    r, q = divmod(k, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = \
        images[k]
  return grid


def save_png(path, image_uint8: np.ndarray) -> None:
  write_bytes(path, _png_bytes(image_uint8))
