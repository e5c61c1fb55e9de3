"""Progress of recover, a store.Store per method: finished batches (.npz) and the compat_q2
chain carries beside its steps, and the in-flight group as each process's one step, so a killed
run resumes where it stopped."""

import time

import jax
import numpy as np

from dwa_jax import files, multihost, status, store
from dwa_jax.synthesis import BatchState, ChainCarry


class Progress:
  """Finished batches (.npz, atomic) and the in-flight group (Orbax) of one method's run."""

  def __init__(self, root, fingerprint: dict):
    self.store = store.Store(root, fingerprint, "synthesis", per_process=True)
    self.root = self.store.directory

  def done_path(self, i: int, j: int):
    return self.root / "done" / f"batch_{i:05d}_{j:03d}.npz"

  def is_done(self, i: int, j: int) -> bool:
    return self.done_path(i, j).exists()

  def save_done(self, i: int, j: int, x: np.ndarray, summary: dict) -> None:
    files.save_npz(self.done_path(i, j), x=x, **{k: np.asarray(v) for k, v in summary.items()})

  def check_done(self, i: int, j: int) -> None:
    """A cheap check of a finished batch found on resuming (its zip directory and member
    names), so a damaged file is reported now rather than after the remaining batches."""
    path = self.done_path(i, j)
    with files.reading(path, "finished recover batch", "; delete it to recompute that batch"):
      with files.open_npz(path) as f:
        if "x" not in f.files:
          raise ValueError(f"no pixels 'x' (holds {sorted(f.files)})")

  def load_done(self, i: int, j: int, shape=None) -> tuple[np.ndarray, dict]:
    """The pixels and summary of finished batch (i, j); `shape` the pixels' expected shape."""
    path = self.done_path(i, j)
    with files.reading(path, "finished recover batch", "; delete it to recompute that batch"):
      with files.open_npz(path) as f:
        x, summary = f["x"], {k: f[k].item() for k in f.files if k != "x"}
      if shape is not None and x.shape != tuple(shape):
        raise ValueError(f"pixels of shape {x.shape}, expected {tuple(shape)}")
      if not np.all(np.isfinite(x)):
        raise ValueError("non-finite pixels")
    return x, summary

  def carry_path(self, i: int, j: int):
    return self.root / "carry" / f"batch_{i:05d}_{j:03d}.npz"

  def save_carry(self, i: int, j: int, chain: ChainCarry) -> None:
    """compat_q2: what batch (i, j) hands batch (i, j + 1); written before its done file."""
    leaves = jax.tree.leaves(jax.device_get(chain))
    files.save_npz(self.carry_path(i, j), **{f"leaf_{n:04d}": np.asarray(a)
                                             for n, a in enumerate(leaves)})

  def load_carry(self, i: int, j: int, params) -> ChainCarry:
    """The carry batch (i, j) saved, shaped like ChainCarry(params, params)."""
    template = ChainCarry(params, params)
    path = self.carry_path(i, j)
    with files.reading(path, "recover chain carry", self.store.hint):
      with files.open_npz(path) as f:
        leaves = [f[f"leaf_{n:04d}"] for n in range(len(f.files))]
      return jax.tree.unflatten(jax.tree.structure(template), leaves)

  def drop_carry(self, i: int, j: int) -> None:
    self.carry_path(i, j).unlink(missing_ok=True)

  def clear_inflight(self) -> None:
    self.store.clear()

  def save_inflight(self, group_id: str, state: BatchState) -> int:
    """Replaces the in-flight checkpoint with a group's (`state` stacked over its batches; the
    group's name saved with it). Returns the bytes of state saved."""
    tree = _host_tree(state)
    self.store.save(int(np.asarray(state.t)[0]), tree, {"group": group_id})
    return sum(a.nbytes for a in jax.tree.leaves(tree))

  def load_inflight(self, group_id: str, state: BatchState):
    """The saved pixels/Adam/t of this group as a stacked state placed like `state`, or None
    (no checkpoint, or another group's)."""
    step = self.store.latest()
    if step is None:
      return None
    try:
      restored, meta = self.store.restore(step, _host_tree(state))
    except Exception as e:  # pylint: disable=broad-except
      # A kill in the middle of a save can leave a step directory Orbax cannot read. The group
      # is a pure function of its inputs, so restarting it gives the same bytes.
      status.say(f"recover: in-flight checkpoint of batches {group_id} is unreadable "
                 f"({type(e).__name__}); restarting them")
      self.clear_inflight()
      return None
    if meta.get("group") != group_id:
      return None
    part = jax.tree.map(lambda a, old: jax.device_put(a, old.sharding), restored,
                        _resumable(state))
    return state._replace(**part)


def _resumable(state: BatchState) -> dict:
  """What an in-flight checkpoint holds: everything the iterations change (start_batch
  recomputes the rest)."""
  part = {"x": state.x, "adam": state.adam, "t": state.t}
  if state.weight_grad_sum is not None:
    part["weight_grad_sum"] = state.weight_grad_sum
  return part


def _host_tree(state: BatchState) -> dict:
  """The resumable part of a group's (stacked) state, on the host."""
  return jax.tree.map(np.asarray, _resumable(state))


def wait_for_batches(progress: Progress, owners: dict, timeout_s: float) -> None:
  """Process 0 waits until every batch is on disk (a shared work directory); `owners` maps each
  (ipc index, chunk) to the process that synthesises it. A process that stops (its heartbeat,
  multihost.py) ends the wait with one line."""
  missing = {b for b in owners if not progress.is_done(*b)}

  def absent() -> set[int]:
    missing.difference_update([b for b in missing if progress.is_done(*b)])
    return {owners[b] for b in missing}
  session = multihost.session()
  if session is not None:
    session.wait(absent, f"{len(missing)} recover batches in {progress.root}", timeout_s)
    return
  deadline = time.time() + timeout_s  # no run's Session (library use): a plain deadline
  while absent():
    if time.time() > deadline:
      raise TimeoutError(f"recover: {len(missing)} batches from other processes did not appear "
                         f"in {progress.root} within {timeout_s:.0f} s.")
    time.sleep(1.0)
