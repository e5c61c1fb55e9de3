"""Output writing of recover: the finished batches streamed, one at a time, into the synthetic
set's files (images.npz, PNG or JPEG folder, grid, recover.json, manifest)."""

import contextlib
import pathlib

import numpy as np

from dwa_jax import compat, files, image_files
from dwa_jax.progress import Progress

GRID_MAX_ROWS, GRID_MAX_CLASSES = 10, 20


def write_outputs(out_dir: pathlib.Path, progress: Progress, config, method: str, meta,
                  num_classes: int, chunks, synthesis: dict, switches: dict, init: str,
                  stage: dict | None = None) -> dict:
  """Streams the finished batches (in ipc/class order, one batch in memory at a time) into the
  outputs (docs/config.md; with recover.compat_jpeg docs/compatibility.md), then the manifest.

  images.npz always holds the set students train on. `synthesis` (the engine's settings),
  `switches` (recover.compat_record) and `init` are recorded in recover.json.
  """
  image_shape = tuple(meta["image_shape"])
  mean, std = (np.asarray(v) for v in compat.pixel_normalisation(config, meta))
  jpeg = bool(config.recover.compat_jpeg)
  n_images = config.ipc * num_classes
  shown = min(num_classes, GRID_MAX_CLASSES)
  grid = np.zeros((min(config.ipc, GRID_MAX_ROWS), shown, *image_shape), np.float32)
  kinds = ("lossless", "jpeg") if jpeg else ("lossless",)
  stats = {kind: image_files.PixelStatistics() for kind in kinds}
  # images.npz: the set students train on; images_lossless.npz: the last iterate, beside JPEGs.
  written, batches = ["images.npz"] + (["images_lossless.npz"] if jpeg else []), []
  with contextlib.ExitStack() as stack:
    writers = [stack.enter_context(files.NpzWriter(out_dir / name)) for name in written]
    with contextlib.ExitStack() as streams:
      write = [streams.enter_context(writer.rows("images", (n_images, *image_shape), np.float32))
               for writer in writers]
      for i in range(config.ipc):
        for j, classes in enumerate(chunks):
          x, summary = progress.load_done(i, j, (len(classes), *image_shape))
          batches.append(summary)
          pixels = np.clip(x * std + mean, 0.0, 1.0).astype(np.float32)  # de-normalise
          stats["lossless"].update(pixels)
          if jpeg:
            write[1](pixels)  # images_lossless.npz
            blobs = [compat.official_jpeg_bytes(image) for image in pixels]
            for c, blob in zip(classes, blobs):
              name = f"jpg/new{c:03d}/class{c:03d}_id{i:03d}.jpg"
              files.write_bytes(out_dir / name, blob)
              written.append(name)
            pixels = np.stack([compat.decode_jpeg(b, image_shape[-1]) for b in blobs]
                              ).astype(np.float32) / 255.0
            stats["jpeg"].update(pixels)
          else:
            written += [f"png/{f}" for f in image_files.save_image_folder(
                out_dir / "png", pixels, classes, ids=np.full(len(classes), i))]
          write[0](pixels)
          if i < len(grid):
            keep = classes < shown
            grid[i, classes[keep]] = pixels[keep]
    for writer in writers:
      writer.add("labels", np.tile(np.arange(num_classes, dtype=np.int32), config.ipc))
      writer.add("mean", mean.astype(np.float32))
      writer.add("std", std.astype(np.float32))
  return _finish_outputs(out_dir, config, method, meta, grid, stats, batches, written,
                         mean, std, n_images, synthesis, switches, init, stage)


def _finish_outputs(out_dir, config, method, meta, grid, stats, batches, written, mean,
                    std, n_images, synthesis, switches, init, stage) -> dict:
  image_shape = grid.shape[2:]
  image_files.save_png(out_dir / "grid.png", image_files.image_grid(
      grid.reshape(-1, *image_shape), grid.shape[0], grid.shape[1]))
  written.append("grid.png")
  summary = {"method": method, "ipc": config.ipc, "num_images": n_images,
             "synthesis": synthesis, "init": init, "seed": config.seed, "teacher": meta,
             "normalisation": {"mean": mean.tolist(), "std": std.tolist()},
             "format": "jpeg_q75" if config.recover.compat_jpeg else "lossless",
             "compat": switches,
             "pixel_statistics": {k: s.result() for k, s in stats.items()},
             "stage": stage, "batches": batches}
  files.write_json(out_dir / "recover.json", summary)
  written.append("recover.json")
  write_manifest(out_dir, written)
  return summary


def write_manifest(out_dir, names) -> None:
  """manifest.json: the sha256 of each file `names` in `out_dir`. Written last, so that its
  presence marks a finished set; relabel checks the images against it."""
  files.write_json(out_dir / "manifest.json",
                   {"files": {name: files.sha256(out_dir / name) for name in names}})
