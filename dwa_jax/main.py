"""Entry point: `python -m dwa_jax.main --config=configs/<name>.py --workdir=DIR`.

Runs the stage(s) chosen by `--config.stage` (squeeze | recover | relabel | all); every config
field can be overridden on the command line, e.g. `--config.ipc=50 --config.recover.iterations=500`.
Outputs under DIR: teacher/ (Orbax checkpoint), synthetic/<method>/ (images.npz, png/, grid.png),
results.json / results.md, metrics.jsonl (one JSON object per logged step) and config.json.
"""

import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dwa_jax import files, presets

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
    files.write_bytes(path / ".write_check", b"ok")
    (path / ".write_check").unlink()
  except OSError as e:
    raise PermissionError(f"workdir {workdir!r} is not writable: {e.strerror}") from None
  return path


def run_stages(config, workdir) -> dict:
  """Runs the configured stage(s) in order; returns what the last one produced."""
  from dwa_jax import recover, relabel, squeeze  # heavy imports only once flags parsed
  presets.validate(config)
  workdir = prepare_workdir(workdir)
  files.write_json(workdir / "config.json", config.to_dict())
  out = {}
  if config.stage in ("squeeze", "all"):
    out = squeeze.run(config, workdir)
  if config.stage in ("recover", "all"):
    out = {m: recover.run(config, workdir, m) for m in config.methods}
  if config.stage in ("relabel", "all"):
    out = relabel.run(config, workdir)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every read and write at INFO
  try:
    run_stages(FLAGS.config, FLAGS.workdir)
  except (ValueError, OSError, FloatingPointError) as e:
    # One clear line instead of a traceback for bad input; the exit code says it failed.
    print(f"dwa_jax: error: {e}", file=sys.stderr)
    sys.exit(2)


def run():
  """Console script `dwa-jax`."""
  app.run(main)


if __name__ == "__main__":
  run()
