"""Images the pipeline writes: 8-bit PNGs (one file, an ImageFolder, a grid) and running pixel
statistics of a set."""

import io

import numpy as np
from PIL import Image

from dwa_jax.files import as_path, write_bytes


def to_uint8(images01: np.ndarray) -> np.ndarray:
  """[0, 1] floats -> uint8, rounded (the official code truncates and then saves JPEG)."""
  return np.clip(np.rint(np.asarray(images01) * 255.0), 0, 255).astype(np.uint8)


def _png_bytes(image_uint8: np.ndarray) -> bytes:
  if image_uint8.shape[-1] == 1:
    image_uint8 = image_uint8[..., 0]
  buf = io.BytesIO()
  Image.fromarray(image_uint8).save(buf, format="PNG")
  return buf.getvalue()


def save_image_folder(root, images01: np.ndarray, labels: np.ndarray, ids=None) -> list[str]:
  """Writes `root/class{c:03d}/class{c:03d}_id{i:03d}.png` (8-bit PNG); returns the files. `ids`
  gives each image's i; by default images are numbered per class in order."""
  root = as_path(root)
  counts: dict[int, int] = {}
  files = []
  for k, (image, label) in enumerate(zip(to_uint8(images01), np.asarray(labels))):
    c = int(label)
    i = counts.get(c, 0) if ids is None else int(ids[k])
    counts[c] = i + 1
    rel = f"class{c:03d}/class{c:03d}_id{i:03d}.png"
    write_bytes(root / rel, _png_bytes(image))
    files.append(rel)
  return files


def pixel_statistics(images01: np.ndarray) -> dict:
  """Pixel std of a set in [0, 1], and the fraction of pixels at 0 or 255 in 8 bits."""
  return PixelStatistics().update(images01).result()


class PixelStatistics:
  """`pixel_statistics` accumulated over batches (float64 sums), for sets streamed to disk."""

  def __init__(self):
    self.count, self.total, self.squares, self.clipped = 0, 0.0, 0.0, 0

  def update(self, images01) -> "PixelStatistics":
    x = np.asarray(images01, np.float64)
    levels = np.rint(x * 255)
    self.count += x.size
    self.total += float(x.sum())
    self.squares += float(np.square(x).sum())
    self.clipped += int(np.count_nonzero((levels <= 0) | (levels >= 255)))
    return self

  def result(self) -> dict:
    mean = self.total / self.count
    return {"std": float(np.sqrt(max(self.squares / self.count - mean * mean, 0.0))),
            "clipped_fraction": self.clipped / self.count}


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
    top, left = pad + r * (h + pad), pad + q * (w + pad)
    grid[top:top + h, left:left + w] = images[k]
  return grid


def save_png(path, image_uint8: np.ndarray) -> None:
  write_bytes(path, _png_bytes(image_uint8))
