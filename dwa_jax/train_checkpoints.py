"""Resume for squeeze and relabel: an Orbax CheckpointManager of one training run, saved every N
epochs, holding everything the run changes — the train state (parameters, BatchNorm statistics,
optimizer state, step), the PRNG key, the input pipeline's position (grain's iterator state, one
file per process) and the evaluations so far. Restoring it and going on gives the same bits as a
run that was never stopped (on the same devices)."""


import grain
import jax
import orbax.checkpoint as ocp

from dwa_jax import files, multihost


class TrainCheckpoints:
  """The checkpoints of one run in `directory`; `fingerprint` (the settings that determine the
  run) is stamped beside them, and a run with other settings starts over."""

  def __init__(self, directory, fingerprint: dict, every_epochs: int):
    self.directory = files.absolute(directory)
    self.every = every_epochs
    self.hint = f"; delete {self.directory} to start this training over"
    multihost.claim_directory(self.directory, fingerprint, "resume checkpoints", self.hint)
    self.manager = ocp.CheckpointManager(
        self.directory / "epochs", options=ocp.CheckpointManagerOptions(
            max_to_keep=1, enable_async_checkpointing=False, cleanup_tmp_directories=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "history": ocp.JsonCheckpointHandler()})

  def due(self, epoch: int, epochs: int) -> bool:
    """Whether to save after (1-based) `epoch`: every N epochs, not after the last."""
    return bool(self.every) and epoch % self.every == 0 and epoch < epochs

  def save(self, epoch: int, state, key, batches, history: list) -> None:
    # The key as its raw uint32 data, beside the state (one array item).
    self.manager.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"train_state": state, "key": jax.random.key_data(key)}),
        data=grain.checkpoint.CheckpointSave(batches),
        history=ocp.args.JsonSave({"history": history})))
    self.manager.wait_until_finished()

  def restore(self, state, batches):
    """(epoch, state, key, history) of the latest checkpoint, with `batches` moved to its
    position; None without one. `state` gives the structure and the shardings."""
    epoch = self.manager.latest_step()
    if epoch is None:
      return None
    key_data = jax.random.key_data(jax.random.key(0))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            {"train_state": state, "key": key_data})
    # Orbax writes a step atomically (a temporary folder renamed), so an unreadable one was
    # damaged afterwards: reported, never deleted here (it may hold hours of training).
    with files.reading(self.directory / "epochs" / str(epoch), "resume checkpoint", self.hint):
      restored = self.manager.restore(epoch, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract),
          data=grain.checkpoint.CheckpointRestore(batches), history=ocp.args.JsonRestore()))
      history = [tuple(h) for h in restored["history"]["history"]]
      key = jax.random.wrap_key_data(restored["state"]["key"])
    return epoch, restored["state"]["train_state"], key, history

  def remove(self) -> None:
    """Deletes the checkpoints once the run's results are written."""
    self.manager.close()
    multihost.barrier(f"checkpoints-done:{self.directory}")
    if jax.process_index() == 0:
      files.remove_tree(self.directory)
