"""Which Δθ arithmetic the students need: DWA synthesised under each accelerator arithmetic,
emulated on the CPU, and scored by the students.

  python benchmarks/arithmetic_accuracy.py [--rows=exact,tf32_direct,bf16_direct,tf32_split,bf16_split]
      [--workdir=workdir/arithmetic_accuracy] [--config=configs/reproduce_cifar10_convnet_official.py]

CIFAR-10 ipc 10, ConvNet-128, the saved 84.84 % teacher the config imports, students under the
config's protocol (official, 3 seeds). A row is one DWA set:

* `exact`: float32 read exactly (the CPU; pre-Ampere GPUs);
* `tf32_direct`, `tf32_split`: every convolution and matmul of the teacher reads its operands
  (forward, and the cotangent backward) with TF32's 10 mantissa bits, float32 sums: JAX's
  default on Ampere and later GPUs (`recover.emulate=tf32`), Δθ entering as θ + Δθ or split;
* `bf16_direct`, `bf16_split`: the same with bfloat16's 7 bits, the TPU's default one pass
  (`recover.emulate=bfloat16`).

Per row: the students (final and best top-1 per seed), the synthesis's final CE and BN loss,
its Δθ survival in weight space (`delta_cosine`, mean over batches), recover's seconds on this
CPU (the emulation's rounding included: not an accelerator's cost), and the accelerator's cost
of the form: XLA's FLOPs of one synthesis iteration of the native program (no emulation) with
that Δθ form, and SRe2L's. Rows already finished are reused; the JSON is written after every
row, each with its own command. Writes benchmarks/results/arithmetic_accuracy.json.
"""

import pathlib
import re
import time

from absl import app
from absl import flags
import jax
import numpy as np

import common
from dwa_jax import device_dispatch, files, provenance, recover, relabel, synthesis

FLAGS = flags.FLAGS
ROWS = {"exact": ("none", "direct"), "tf32_direct": ("tf32", "direct"),
        "tf32_split": ("tf32", "split"), "bf16_direct": ("bfloat16", "direct"),
        "bf16_split": ("bfloat16", "split")}


def row_config(base, row: str):
  emulate, form = ROWS[row]
  return common.with_overrides(base, {
      "methods": ("dwa",), "relabel.random_real_baseline": False, "stage": "relabel",
      "recover.emulate": emulate, "recover.delta_form": form})


def iteration_gflop(config, model, variables, meta, train, method: str, form: str) -> float:
  """XLA's FLOPs of one synthesis iteration (batch of all classes, one device) as an
  accelerator runs it: float32, no emulation, Δθ in `form`."""
  c = common.with_overrides(config, {"recover.emulate": "none", "recover.delta_form": form})
  cfg = recover.synthesis_config(c.recover, method, "cpu")
  shape, classes = tuple(train.images.shape[1:]), train.num_classes
  runner = device_dispatch.GroupRunner(model, variables, shape, tuple(meta["mean"]),
                                       tuple(meta["std"]), cfg, jax.devices()[:1], 1, unroll=True)
  keys = jax.random.split(jax.random.key(0))
  draws = synthesis.draw_augmentation(keys[0], cfg.iterations, cfg, shape[:2])
  x = np.asarray(jax.random.normal(keys[1], (classes, *shape)))
  group, _ = runner.start([x], [np.arange(classes)], [keys[1]], [draws])
  return runner.cost_analysis(group, 1)["flops"] / 1e9


def run_row(base, row: str, root: pathlib.Path) -> dict:
  workdir = root / row
  workdir.mkdir(parents=True, exist_ok=True)
  common.copy_teacher(root / "teacher", workdir)
  config = row_config(base, row)
  record = {"row": row, "emulate": config.recover.emulate,
            "delta_form": config.recover.delta_form}
  seconds = common.cached_recover(config, workdir)
  if seconds:
    record["recover_seconds"] = round(seconds, 1)
  record.update(
      common.batch_means(workdir, ("final_ce", "final_bn_loss", "delta_cosine",
                                   "delta_norm_ratio")),
      images_sha256=files.read_json(
          workdir / "synthetic" / "dwa" / "manifest.json")["files"]["images.npz"])
  started = time.time()
  results = relabel.run(config, workdir)
  (result,) = results["sets"].values()
  record.update(common.set_row(result))
  record["relabel_seconds"] = round(time.time() - started, 1)
  record["card"] = results["protocol"]
  return record


def main(argv):
  rows = common.requested_rows(argv, ROWS.__contains__, f"one of {', '.join(ROWS)}")
  base = FLAGS.config
  root = pathlib.Path(FLAGS.workdir)
  train, (model, variables, meta) = common.row_teacher(base, root)
  out = pathlib.Path(FLAGS.results_dir) / f"{FLAGS.results_name}.json"
  report = files.read_json(out) if out.exists() else {"rows": {}}
  report["teacher_test_accuracy"] = meta["test_accuracy"]
  if "accelerator_gflop_per_iteration" not in report:
    report["accelerator_gflop_per_iteration"] = {
        name: iteration_gflop(base, model, variables, meta, train, method, form)
        for name, method, form in (("sre2l", "sre2l", "direct"), ("dwa_direct", "dwa", "direct"),
                                   ("dwa_split", "dwa", "split"))}
  command = provenance.command()
  for row in rows:
    record = run_row(base, row, root)
    record["command"] = re.sub(r" --rows=\S+", "", command) + f" --rows={row}"
    report["rows"][row] = common.portable(record)
    report["provenance"] = provenance.record()
    files.write_json(out, report)  # after every row: a stopped run keeps the rows done
  flops = report["accelerator_gflop_per_iteration"]
  print("| row | best top-1 | final top-1 | Δθ cosine | final CE | final BN | GFLOP/iteration |")
  print("|---|---|---|---|---|---|---|")
  for name in ROWS:
    if name in report["rows"]:
      r = report["rows"][name]
      print(f"| {name} | {common.fmt(r['best_mean'], r['best_std'])} | "
            f"{common.fmt(r['final_mean'], r['final_std'])} | {r['delta_cosine']:.4f} | "
            f"{r['final_ce']:.4f} | {r['final_bn_loss']:.3f} | "
            f"{flops['dwa_' + r['delta_form']]:.3f} |")


def define_flags() -> None:
  common.define_row_flags("arithmetic_accuracy", ",".join(ROWS),
                          f"Comma-separated rows of {', '.join(ROWS)}.", "Name of the JSON.")


if __name__ == "__main__":
  define_flags()
  flags.adopt_module_key_flags(common)  # their --help lists the shared flags
  app.run(main)
