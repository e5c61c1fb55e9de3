"""Scratch memory of DWA's K-step weight adjustment: unrolled (the CPU's form) against the
`lax.scan` accelerators run, for K in {1, 4, 15} and P = recover.batches_per_device in {1, 4}.

Compiles (nothing runs) the recover stage's programs through `GroupRunner.compile_stats` for a
randomly initialised ResNet-18 at 224 px, one batch of 100 classes per ipc index (the ImageNet
setting), on one CPU device, and records XLA's `memory_analysis` (temp, argument and output
bytes) and the compile seconds of

  ascent.<form>.K<k>.P<p>   the weight adjustment (start program) of a group of P batches
  iteration.<form>.P<p>     one synthesis iteration of the same group, the comparison

Target: the scanned ascent's temp bytes stay <= 1.5x one iteration's at every K and P
(`targets.scan_temp_within_1_5x_iteration`). XLA's memory analysis is of the CPU compilation;
a GPU or TPU compilation schedules differently (benchmarks/accelerator_check.py measures there).

`--time_ascent` adds why the CPU keeps the unrolled form: `cpu_ascent_seconds`, the median of 3
timed weight adjustments (after one that compiles) of a ResNet-18 with the CIFAR stem, batch 10,
K = 12, unrolled and scanned, merged into the JSON.

    python benchmarks/ascent_memory.py [--quick] [--time_ascent] [--out FILE]
"""

import argparse
import json
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="ConvNet at 32 px, 10 classes, K in {1, 4}: the plumbing only")
  parser.add_argument("--time_ascent", action="store_true",
                      help="only time the CPU ascent, unrolled vs scanned (merged into --out)")
  parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ascent_memory.json"))
  args = parser.parse_args(argv)
  import dwa_jax  # pylint: disable=unused-import,g-import-not-at-top  (XLA options first)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dwa_jax import device_dispatch, provenance, synthesis  # pylint: disable=g-import-not-at-top
  from dwa_jax.models import build_model  # pylint: disable=g-import-not-at-top

  if args.time_ascent:
    return time_ascent(pathlib.Path(args.out), argv)
  if args.quick:
    name, size, classes, ks, ps = "convnet", 32, 10, (1, 4), (1, 2)
  else:
    name, size, classes, ks, ps = "resnet18", 224, 100, (1, 4, 15), (1, 4)
  image = (size, size, 3)
  model = build_model(name, 1000 if name == "resnet18" else classes)
  variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, *image), np.float32))
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  device = jax.devices()[:1]
  rows = {}

  def measure(key, k, p, unroll, steps):
    cfg = synthesis.SynthesisConfig(iterations=2000, adjust_steps=k, jitter=32,
                                  augment="crop_flip_roll", r_var=2.0)
    runner = device_dispatch.GroupRunner(model, variables, image, mean, std, cfg, device, p,
                                 unroll=unroll)
    rows[key] = runner.compile_stats(classes, image, steps)
    print(f"{key:24s} temp {rows[key]['temp_bytes'] / 2**30:7.3f} GiB   compile "
          f"{rows[key]['compile_seconds']:7.1f} s", flush=True)

  for p in ps:
    for form, unroll in (("scan", False), ("unrolled", True)):
      measure(f"iteration.{form}.P{p}", 1, p, unroll, 1)
      for k in ks:
        measure(f"ascent.{form}.K{k}.P{p}", k, p, unroll, None)

  ratio = {f"K{k}.P{p}": round(rows[f"ascent.scan.K{k}.P{p}"]["temp_bytes"]
                               / rows[f"iteration.scan.P{p}"]["temp_bytes"], 3)
           for k in ks for p in ps}
  result = {
      "provenance": provenance.record(None if argv is None else [__file__, *argv]),
      "setting": {"model": name, "image": list(image), "classes_per_batch": classes,
                  "augment": "crop_flip_roll", "devices": 1, "backend": jax.default_backend(),
                  "quick": args.quick},
      "programs": rows,
      "scan_ascent_temp_over_iteration": ratio,
      "targets": {"scan_temp_within_1_5x_iteration": all(r <= 1.5 for r in ratio.values())},
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1) + "\n")
  print("\n| program | P | temp GiB (scan) | temp GiB (unrolled) | compile s (scan / unrolled) |")
  print("|---|---|---|---|---|")
  for p in ps:
    for k in (None, *ks):
      base = "iteration" if k is None else "ascent"
      s, u = (rows[f"{base}.{f}{'' if k is None else f'.K{k}'}.P{p}"] for f in ("scan", "unrolled"))
      label = "1 iteration" if k is None else f"ascent K={k}"
      print(f"| {label} | {p} | {s['temp_bytes'] / 2**30:.3f} | {u['temp_bytes'] / 2**30:.3f} | "
            f"{s['compile_seconds']} / {u['compile_seconds']} |")
  print(f"\nscan ascent temp / one iteration's: {ratio}\ntargets: {result['targets']}")
  print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out.name}")


def time_ascent(out: pathlib.Path, argv) -> None:
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dwa_jax import device_dispatch, provenance, recover, synthesis  # pylint: disable=g-import-not-at-top
  from dwa_jax.models import build_model  # pylint: disable=g-import-not-at-top
  model = build_model("resnet18_cifar", 10)
  variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
  cfg = synthesis.SynthesisConfig(iterations=4, adjust_steps=12)
  keys = jax.random.split(recover.batch_key(0, 0, 0))
  x = np.asarray(jax.random.normal(keys[0], (1, 10, 32, 32, 3)))
  labels, draws = np.arange(10)[None], [recover.batch_draws(0, 0, 0, cfg, (32, 32))]
  seconds = {}
  for form, unroll in (("unrolled", True), ("scan", False)):
    runner = device_dispatch.GroupRunner(model, variables, (32, 32, 3), (0.5,) * 3, (0.25,) * 3, cfg,
                                 jax.devices()[:1], 1, unroll=unroll)
    times = []
    for _ in range(4):  # the first compiles
      started = time.perf_counter()
      group, _ = runner.start(x, labels, [keys[1]], draws)
      jax.block_until_ready(group.state.delta)
      times.append(time.perf_counter() - started)
    seconds[form] = round(sorted(times[1:])[1], 3)
    print(f"ascent K=12, batch 10, {form}: {seconds[form]} s", flush=True)
  result = json.loads(out.read_text()) if out.exists() else {}
  result["cpu_ascent_seconds"] = {"setting": "resnet18_cifar, 32 px, batch 10, K = 12, one CPU "
                                             "device; median of 3 after a compiling run",
                                  **seconds, "provenance": provenance.record(
                                      None if argv is None else [__file__, *argv])}
  out.write_text(json.dumps(result, indent=1) + "\n")
  print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out.name}")


if __name__ == "__main__":
  main()
