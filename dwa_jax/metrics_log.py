"""Metrics of a run: one JSON object per logged step in `metrics.jsonl`, and the same numbers
as TensorBoard scalars (tensorboardX) under `tensorboard/`."""

import json
import os
import re
import sys
import time

import numpy as np

from dwa_jax.files import as_path, is_remote, json_default, write_bytes


def _import_tensorboardx():
  """tensorboardX, imported with torch hidden unless torch is loaded already: tensorboardX
  imports torch whenever it is installed, only to accept torch tensors (docs/code.md)."""
  if "torch" in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX
  sys.modules["torch"] = None  # `import torch` now raises ImportError
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return tensorboardX


class MetricsLog:
  """Appends one JSON object per line (stage, step, wall time, values) to `path`, and writes
  every finite number among the values as a TensorBoard scalar `<stage>/<name>` (tensorboardX
  event files in `<path's folder>/tensorboard/`, one file per process). Every file has one
  writer: process k > 0 of a multi-process run appends to `<stem>.p<k><suffix>` instead
  (metrics.p1.jsonl: its own recover batches)."""

  def __init__(self, path, tensorboard: bool = True):
    import jax  # pylint: disable=g-import-not-at-top
    self.path = as_path(path)
    process = jax.process_index()
    if process:
      self.path = self.path.with_name(f"{self.path.stem}.p{process}{self.path.suffix}")
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.tensorboard = tensorboard
    self._writer = None

  def write(self, stage: str, step: int, **values) -> None:
    record = {"stage": stage, "step": int(step), "time": round(time.time(), 3), **values}
    line = json.dumps(record, default=json_default) + "\n"
    if is_remote(self.path):  # object stores cannot append: the object is written again
      before = self.path.read_text() if self.path.exists() else ""
      write_bytes(self.path, (before + line).encode())
    else:
      with self.path.open("a") as f:
        f.write(line)
    if self.tensorboard:
      self._scalars(stage, [(name, v, step) for name, v in values.items()
                            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)])

  def series(self, stage: str, name: str, steps, values) -> None:
    """Many points of one TensorBoard scalar (not in the JSONL log): per-iteration curves."""
    if self.tensorboard:
      self._scalars(stage, [(name, value, step) for step, value in zip(steps, values)])

  def _tensorboard(self):
    if self._writer is None:
      import jax  # pylint: disable=g-import-not-at-top
      self._writer = _import_tensorboardx().SummaryWriter(
          os.fspath(self.path.parent / "tensorboard"),
          filename_suffix=f".p{jax.process_index()}")
    return self._writer

  def _scalars(self, stage: str, points) -> None:
    """Writes the finite ones of the (name, value, step) `points` as scalars `<stage>/<name>`."""
    points = [(name, float(v), int(step)) for name, v, step in points if np.isfinite(v)]
    if not points:
      return
    writer = self._tensorboard()
    for name, value, step in points:
      writer.add_scalar(re.sub(r"[^A-Za-z0-9_./-]+", "_", f"{stage}/{name}"), value, step)
    writer.flush()
