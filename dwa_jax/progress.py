"""Progress persistence of recover: finished batches (.npz), the compat_q2 chain carries and the
in-flight group's Orbax checkpoint, so a killed run resumes where it stopped."""

import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from dwa_jax import files, multihost, status
from dwa_jax.synthesis import BatchState, ChainCarry


class Progress:
  """Finished batches (.npz, atomic) and the in-flight group (Orbax) of one method's run."""

  def __init__(self, root, fingerprint: dict):
    self.root = root = files.as_path(root)
    self.hint = f"; delete {root} to start this synthesis over"
    multihost.claim_directory(root, fingerprint, "recover progress", self.hint)
    # One in-flight checkpoint per process, each written by its own process alone.
    process = jax.process_index()
    self.marker = root / f"inflight_p{process}.json"
    (root / f"inflight_p{process}").mkdir(exist_ok=True)
    self.manager = ocp.CheckpointManager(
        files.absolute(root / f"inflight_p{process}"), options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=False, enable_async_checkpointing=False,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=process, active_processes={process})))

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
    with files.reading(path, "recover chain carry", self.hint):
      with files.open_npz(path) as f:
        leaves = [f[f"leaf_{n:04d}"] for n in range(len(f.files))]
      return jax.tree.unflatten(jax.tree.structure(template), leaves)

  def drop_carry(self, i: int, j: int) -> None:
    self.carry_path(i, j).unlink(missing_ok=True)

  def clear_inflight(self) -> None:
    for step in self.manager.all_steps():
      try:
        self.manager.delete(step)
      except Exception:  # pylint: disable=broad-except
        files.remove_tree(self.manager.directory / str(step))

  def save_inflight(self, group_id: str, state: BatchState) -> int:
    """Replaces the in-flight checkpoint of a group (`state` stacked over its batches); the
    group marker is written before the state, so a kill at any point leaves either a matching
    pair or nothing to resume from. Returns the bytes of state saved."""
    self.clear_inflight()
    files.write_json(self.marker, {"group": group_id})
    tree = _host_tree(state)
    self.manager.save(int(np.asarray(state.t)[0]), args=ocp.args.StandardSave(tree))
    self.manager.wait_until_finished()
    return sum(a.nbytes for a in jax.tree.leaves(tree))

  def load_inflight(self, group_id: str, state: BatchState):
    """The saved pixels/Adam/t of this group as a stacked state placed like `state`, or None
    (no checkpoint, or another group's)."""
    step = self.manager.latest_step()
    if step is None or not self.marker.exists():
      return None
    try:
      if files.read_json(self.marker, "in-flight marker").get("group") != group_id:
        return None
      restored = self.manager.restore(step, args=ocp.args.StandardRestore(_host_tree(state)))
    except Exception as e:  # pylint: disable=broad-except
      # A kill in the middle of a save can leave a step directory Orbax cannot read. The group
      # is a pure function of its inputs, so restarting it gives the same bytes.
      status.say(f"recover: in-flight checkpoint of batches {group_id} is unreadable "
            f"({type(e).__name__}); restarting them")
      self.clear_inflight()
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
