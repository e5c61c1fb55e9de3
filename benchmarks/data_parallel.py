"""Data-parallel squeeze and relabel: training steps per second by device count, and compilations.

On a CPU the devices are forced (`--xla_force_host_platform_device_count`) and share the same
cores, so the table checks that every device count runs, and what splitting the batch costs in
overhead; it says nothing about speed-up (that needs an accelerator: run this there, without
--cpu_devices). For each device count it times `--steps` training steps (after one warm-up step
that compiles) of

  squeeze  the teacher's step: crop + flip, cross-entropy
  relabel  the student's step: crop + flip, mixup, the frozen teacher's soft labels on the same
           images (computed sharded), KL loss

at the global batch `--batch`, per-replica BatchNorm statistics, plus one row with synchronised
statistics on every device. Then it runs relabel end to end on the digits data (3 seeds, a
synthetic set and the random real baseline) and counts the programs compiled: the step and the
evaluation compile once per input type, not per seed or set.

Writes benchmarks/results/data_parallel.json: `rows` (stage, devices, sync_batch_norm,
steps_per_second, images_per_second, step_compilations) and `relabel_run` (sets, seeds,
train_step, evaluation, xla_compilations).

    python benchmarks/data_parallel.py [--quick] [--cpu_devices 8] [--out FILE]
"""

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "data_parallel.json"


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="ConvNet on 8x8 images, 3 steps: a check that it runs")
  parser.add_argument("--cpu_devices", type=int, default=8,
                      help="forced CPU devices (0: use the machine's devices as they are)")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--model", default="resnet18_cifar")
  parser.add_argument("--out", default=str(RESULTS))
  return parser.parse_args()


class CompileCounter:
  """Counts XLA compilations (jax.monitoring's backend-compile events) from its creation."""

  def __init__(self):
    import jax  # pylint: disable=g-import-not-at-top
    self.count = 0

    def listener(event, duration, **kwargs):
      del duration, kwargs
      if event == "/jax/core/compile/backend_compile_duration":
        self.count += 1
    jax.monitoring.register_event_duration_secs_listener(listener)


def time_steps(stage: str, num_devices: int, sync: bool, args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dwa_jax import (data_parallel, input_pipeline, presets, relabel, squeeze,  # pylint: disable=g-import-not-at-top
                       train_loop)
  from dwa_jax.models import build_model  # pylint: disable=g-import-not-at-top

  size, channels = (8, 1) if args.quick else (32, 3)
  rng = np.random.default_rng(0)
  n = args.batch * (args.steps + 1)
  images = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
  labels = rng.integers(0, 10, (n,)).astype(np.int32)
  mean, std = (0.5,) * channels, (0.25,) * channels
  layout = data_parallel.Layout(data_parallel.data_mesh(jax.devices()[:num_devices]), sync)
  c = presets.cifar("cifar10", model=args.model)
  recipe = c.teacher if stage == "squeeze" else c.relabel
  recipe.batch_size = args.batch
  model = build_model(args.model, 10)
  aux = None
  if stage == "squeeze":
    prepare, loss = squeeze.teacher_input("crop_flip", mean, std), squeeze.cross_entropy
  else:
    teacher = build_model(args.model, 10)
    aux = (teacher.init(jax.random.key(1), np.zeros((1, size, size, channels), np.float32)),)
    c.relabel.temperature = 4.0
    prepare = relabel.student_input(c.relabel, (teacher,), mean, std, 10)
    loss = relabel.student_loss(c.relabel)
  trainer = train_loop.Trainer(model, recipe, prepare=prepare, loss=loss, mean=mean, std=std,
                               layout=layout, pipeline=input_pipeline.PipelineConfig())
  return {"stage": stage, "devices": num_devices, "sync_batch_norm": sync,
          **train_loop.time_steps(trainer, images, labels, steps=args.steps, aux=aux)}


def relabel_run(args) -> dict:
  """relabel end to end on digits (one synthetic set, the random real baseline, 3 seeds)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dwa_jax import data, files, presets, relabel, squeeze  # pylint: disable=g-import-not-at-top
  del args
  with tempfile.TemporaryDirectory(prefix="dwa_dp_bench_") as tmp:
    workdir = pathlib.Path(tmp)
    c = presets.demo_digits()
    c.methods, c.ipc = ("dwa",), 2
    c.teacher.epochs, c.relabel.epochs, c.relabel.eval_every = 1, 2, 1
    c.relabel.seeds = (0, 1, 2)
    c = presets.resolve(c)
    squeeze.run(c, workdir)
    train = data.load_dataset("digits", "train")
    picked = data.sample_per_class(train, c.ipc, 0).reshape(-1)
    # A stand-in "synthetic" set: float images in [0, 1], as recover writes them.
    files.save_npz(workdir / "synthetic" / "dwa" / "images.npz",
                   images=train.images[picked].astype(np.float32) / 255.0,
                   labels=train.labels[picked])
    counter = CompileCounter()
    relabel.run(c, workdir)
    (record,) = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["stage"] == "relabel/compilations"]
    return {"sets": 2, "seeds": 3, "train_step": record["train_step"],
            "evaluation": record["evaluation"], "xla_compilations": counter.count}


def main():
  args = parse_args()
  if args.quick:
    args.model, args.steps, args.batch = "convnet", 3, 64
  if args.cpu_devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.cpu_devices}")
  import dwa_jax  # pylint: disable=g-import-not-at-top,unused-import  (its XLA:CPU options first)
  import jax  # pylint: disable=g-import-not-at-top
  available = len(jax.devices())
  counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= available and args.batch % n == 0]
  rows = []
  for stage in ("squeeze", "relabel"):
    for n in counts:
      rows.append(time_steps(stage, n, False, args))
      print(rows[-1], flush=True)
    rows.append(time_steps(stage, counts[-1], True, args))
  run = relabel_run(args)
  device = jax.devices()[0]
  from dwa_jax import provenance  # pylint: disable=g-import-not-at-top
  result = {"provenance": provenance.record(), "date": time.strftime("%Y-%m-%d"),
            "jax": jax.__version__,
            "device": f"{device.platform}: {getattr(device, 'device_kind', '')}",
            "forced_cpu_devices": args.cpu_devices, "xla_flags": os.environ.get("XLA_FLAGS", ""), "machine": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "model": args.model, "global_batch": args.batch,
            "quick": args.quick, "rows": rows, "relabel_run": run}
  print("\n| stage | devices | BN statistics | steps/s | images/s | step compilations |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['stage']} | {r['devices']} | {'sync' if r['sync_batch_norm'] else 'per replica'} "
          f"| {r['steps_per_second']:.3f} | {r['images_per_second']:.1f} | "
          f"{r['step_compilations']} |")
  print(f"\nrelabel, {run['sets']} sets x {run['seeds']} seeds: train step compiled "
        f"{run['train_step']}x, evaluation {run['evaluation']}x, {run['xla_compilations']} XLA "
        "compilations in all")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1) + "\n")
  print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out.name}")


if __name__ == "__main__":
  sys.exit(main())
