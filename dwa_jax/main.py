"""Entry point: `python -m dwa_jax.main --config=configs/<name>.py --workdir=DIR`.

Runs the stage(s) chosen by `--config.stage` (squeeze | recover | relabel | all); every config
field can be overridden on the command line, e.g. `--config.ipc=50 --config.recover.iterations=500`.
Outputs under DIR: teacher/ (Orbax checkpoint), synthetic/<method>/ (images.npz, png/, grid.png),
results.json / results.md, metrics.jsonl (one JSON object per logged step) and config.json.
"""

import os
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
from ml_collections import config_flags

from dwa_jax import compat, files, presets, recover, relabel, squeeze

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, images, results and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def prepare_workdir(workdir: str) -> pathlib.Path:
  """Creates the work directory and checks it is writable before any work starts."""
  path = pathlib.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    # One probe file per process: processes of a multi-process run share the workdir.
    probe = path / f".write_check.{os.getpid()}"
    files.write_bytes(probe, b"ok")
    probe.unlink()
  except OSError as e:
    raise PermissionError(f"workdir {workdir!r} is not writable: {e.strerror}") from None
  return path


flags.DEFINE_string("coordinator_address", None,
                    "Multi-process runs: host:port of process 0 (jax.distributed.initialize).")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many processes.")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.")


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def run_stages(config, workdir) -> dict:
  """Runs the configured stage(s) in order; returns what the last one produced.

  With several processes, every process takes part in every stage: squeeze and relabel are
  data-parallel over all devices of all processes (each process reads its shard of every
  batch), recover splits the ipc indices between processes; process 0 writes the merged
  synthetic set, results.json and config.json.
  """
  presets.validate(config)
  config = compat.resolve(config)  # every quirk switch set (config.json records them)
  workdir = prepare_workdir(workdir)
  lead = jax.process_index() == 0
  out = {}
  if config.stage in ("squeeze", "all"):
    out = squeeze.run(config, workdir)
  if config.stage in ("recover", "all"):
    out = {m: recover.run(config, workdir, m) for m in config.methods}
    _barrier("recover")  # relabel reads the set process 0 has just written
  if config.stage in ("relabel", "all"):
    out = relabel.run(config, workdir)
  if lead:
    files.write_json(workdir / "config.json", config.to_dict())
  return out


def execute(config, workdir) -> int:
  """run_stages with bad input reported as one line on stderr and exit status 2."""
  try:
    run_stages(config, workdir)
  except (ValueError, OSError, FloatingPointError) as e:
    print(f"dwa_jax: error: {e}", file=sys.stderr)
    return 2
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every read and write at INFO
  if FLAGS.coordinator_address:
      jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  sys.exit(execute(FLAGS.config, FLAGS.workdir))


def run():
  """Console script `dwa-jax`."""
  app.run(main)


if __name__ == "__main__":
  run()
