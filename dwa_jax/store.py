"""Resumable state, kept one way: a directory stamped with the settings that determine what it
holds (`fingerprint.json`: other settings start it over) and an Orbax CheckpointManager of
numbered steps, each holding 'state' (arrays), 'meta' (JSON) and, for a training, 'data' (grain's
iterator position, one file per process). Orbax renames a step's temporary folder once it is
complete, so a kill leaves a whole step or none. What a stage has finished lies beside the steps.
"""

import grain
import jax
import orbax.checkpoint as ocp

from dwa_jax import files, multihost, status

STATE, META, DATA = "state", "meta", "data"


def claim(directory, fingerprint: dict, what: str, hint: str) -> None:
  """The fingerprint-or-restart rule: process 0 deletes `directory` when its fingerprint.json
  differs from `fingerprint` (saying so), then creates and stamps it; after a barrier, every
  other process checks that it has the same settings. `what` names the directory in messages;
  `hint` ends error messages."""
  stamp = directory / "fingerprint.json"
  fingerprint = files.as_json(fingerprint)
  if jax.process_index() == 0:
    if stamp.exists() and files.read_json(stamp, f"{what} stamp", hint) != fingerprint:
      status.say(f"{what}: settings changed since {directory} was saved; starting over")
      files.remove_tree(directory)
    elif not stamp.exists() and directory.exists():  # settings unknown: nothing to trust
      files.remove_tree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files.write_json(stamp, fingerprint)
  multihost.barrier(f"claim {directory}")
  if jax.process_index() != 0 and files.read_json(stamp, f"{what} stamp", hint) != fingerprint:
    raise ValueError(f"{what}: process {jax.process_index()} runs with other settings than "
                     f"process 0 (a different teacher, data or config?); compare {stamp} with "
                     "this process's inputs")


class Store:
  """The resumable state of one computation in `directory` (claimed with `fingerprint`). Its
  steps are shared by every process (each writes its part, process 0 the rest), or with
  `per_process` kept by each process alone in `steps_p<index>`."""

  def __init__(self, directory, fingerprint: dict, what: str, *, per_process: bool = False):
    self.directory = files.absolute(directory)
    self.hint = f"; delete {self.directory} to start this {what} over"
    claim(self.directory, fingerprint, what, self.hint)
    process = jax.process_index()
    options = {"max_to_keep": 1, "enable_async_checkpointing": False}
    if per_process:
      self.steps = self.directory / f"steps_p{process}"
      self.steps.mkdir(exist_ok=True)
      options.update(create=False, multiprocessing_options=ocp.options.MultiprocessingOptions(
          primary_host=process, active_processes={process}))
    else:
      self.steps = self.directory / "steps"
      options.update(cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.steps, options=ocp.CheckpointManagerOptions(**options),
        item_handlers={STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler(),
                       DATA: grain.checkpoint.CheckpointHandler()})

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict, data=None) -> None:
    """Saves `state` (arrays), `meta` (JSON) and grain iterator `data` as step `step`, the one
    step kept. A kept step at or after `step` (another computation's, left by a kill) goes
    first: Orbax does not save a step below its latest."""
    if any(s >= step for s in self.manager.all_steps()):
      self.clear()
    args = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
    if data is not None:
      args[DATA] = grain.checkpoint.CheckpointSave(data)
    self.manager.save(step, args=ocp.args.Composite(**args))
    self.manager.wait_until_finished()

  def restore(self, step: int, template, data=None) -> tuple:
    """(state, meta) of step `step`; `template` gives the state's structure, dtypes and
    placement; grain iterator `data`, when given, moves to the saved position."""
    args = {STATE: ocp.args.StandardRestore(
        jax.tree.map(ocp.utils.to_shape_dtype_struct, template)), META: ocp.args.JsonRestore()}
    if data is not None:
      args[DATA] = grain.checkpoint.CheckpointRestore(data)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return restored[STATE], restored[META]

  def clear(self) -> None:
    """Deletes the steps (a damaged one too)."""
    for step in self.manager.all_steps():
      try:
        self.manager.delete(step)
      except Exception:  # pylint: disable=broad-except
        files.remove_tree(self.steps / str(step))

  def finish(self) -> None:
    """Deletes the steps once what they resumed is written beside them (every process calls
    it); the stamp and the finished files stay."""
    self._close(self.steps)

  def remove(self) -> None:
    """Deletes the whole directory once what it resumed is written elsewhere (every process
    calls it)."""
    self._close(self.directory)

  def _close(self, delete) -> None:
    self.manager.close()
    multihost.barrier(f"store-done:{self.directory}")
    if jax.process_index() == 0:
      files.remove_tree(delete)
