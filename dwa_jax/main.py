"""Entry point: `python -m dwa_jax.main --config=configs/<name>.py --workdir=DIR`.

Runs the stage(s) chosen by `--config.stage` (squeeze | recover | relabel | all); every config
field can be overridden on the command line, e.g. `--config.ipc=50`. docs/config.md lists the
flags and the outputs under DIR.
"""

import contextlib
import os
import signal
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from dwa_jax import (cli, convert, data, files, multihost, presets, recover, relabel, squeeze,
                     teacher_store)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, images, results and metrics.")
flags.mark_flags_as_required(["config", "workdir"])
flags.DEFINE_string("coordinator_address", None,
                    "Multi-process runs: host:port of process 0 (jax.distributed.initialize). "
                    "Not needed under SLURM, Open MPI or on a TPU pod slice (--distributed).")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many processes.")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.")
flags.DEFINE_enum("distributed", "auto", multihost.MODES,
                  "Without --coordinator_address: 'auto' starts jax.distributed when the "
                  "launcher's environment says there are several processes (SLURM, Open MPI, "
                  "TPU_WORKER_HOSTNAMES); 'on' always (JAX detects the cluster); 'off' never.")


def check_inputs(config, workdir) -> None:
  """What the configured stages read, checked before any of them runs (on every process of a
  multi-process run; multihost.preflight): the data set's splits, the teacher to import or
  this workdir's teacher, recover's committee, relabel's teacher ensemble and synthetic set.
  Raises the error the stage itself would raise."""
  stages = ("squeeze", "recover", "relabel") if config.stage == "all" else (config.stage,)
  for split in ("train", "test") if {"squeeze", "relabel"} & set(stages) else ("train",):
    data.load_dataset(config.dataset, split, config.data_dir)  # cached for the stages
  if config.teacher.checkpoint:  # imported by squeeze, or by the first stage that needs it
    convert.check_state_dict_file(config.teacher.checkpoint, "teacher.checkpoint")
  elif "squeeze" not in stages:
    teacher_store.check_teacher(workdir)
  if "recover" in stages:
    for path in config.recover.committee:
      teacher_store.check_teacher(path, "recover.committee")
  if "relabel" in stages:
    for path in config.relabel.teacher_ensemble:
      teacher_store.check_teacher(path, "relabel.teacher_ensemble")
    spec = config.relabel.synthetic_set
    kind, _, where = spec.partition(":")
    if spec and kind in ("folder", "npz") and where and not files.as_path(where).exists():
      raise FileNotFoundError(f"relabel.synthetic_set: {where} does not exist")


def run_stages(config, workdir) -> dict:
  """Runs the configured stage(s) in order, every process taking part in each
  (docs/scale-out.md); returns what the last one produced."""
  config = presets.resolve(config)  # the one resolved config (config.json records it)
  workdir = cli.prepare_workdir(workdir)
  lead = jax.process_index() == 0
  with cli.workdir_lock(workdir) if lead else contextlib.nullcontext():
    # Decided by every process before preflight's all-gather, so before any process can start
    # the import and rewrite the teacher the others read.
    import_teacher = config.stage not in ("squeeze", "all") and squeeze.needs_import(config,
                                                                                        workdir)
    multihost.preflight(workdir, lambda: check_inputs(config, workdir),
                        barrier_timeout_s=config.multihost.barrier_timeout_s,
                        stale_after_s=config.multihost.stale_after_s)
    try:
      out = {}
      if config.stage in ("squeeze", "all") or import_teacher:
        out = squeeze.run(config, workdir)
      if config.stage in ("recover", "all"):
        out = {m: recover.run(config, workdir, m) for m in config.methods}
        multihost.barrier("recover")  # relabel reads the set process 0 has just written
      if config.stage in ("relabel", "all"):
        out = relabel.run(config, workdir)
      if lead:
        files.write_json(workdir / "config.json", config.to_dict())
      return out
    finally:
      multihost.end()


def execute(config, workdir) -> int:
  """run_stages with bad input reported as one line on stderr and exit status 2, and Ctrl-C
  (SIGINT) as one line saying how to resume and exit status 130."""
  try:
    run_stages(config, workdir)
  except (ValueError, OSError, FloatingPointError) as e:
    cli.report(f"error: {e}")
    return 2
  except KeyboardInterrupt:
    # Every output is written atomically and progress is checkpointed as the stages go.
    cli.report(cli.interrupted_message(workdir))
    return 130
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  sys.unraisablehook = cli.quiet_closed_loop(sys.unraisablehook)
  signal.signal(signal.SIGINT, cli.on_sigint(FLAGS.workdir))
  logging.set_verbosity(logging.WARNING)  # Orbax logs every read and write at INFO
  try:
    multihost.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         FLAGS.distributed)
  except multihost.StartError as e:
    cli.report(f"error: {e}")
    sys.exit(2)
  status = execute(FLAGS.config, FLAGS.workdir)
  if status in (2, 130):
    # Stopped by bad input or interrupted: leave now. A normal exit would join the input
    # pipeline's reader threads and collect the failed Orbax reads' tasks, which may print
    # tracebacks after the one line; every output is written atomically, so nothing is lost.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # pylint: disable=protected-access
  sys.exit(status)


def run():
  """Console script `dwa-jax`."""
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
