"""What one GPU (or TPU host) does with dwa_jax, measured in about five minutes.

Writes benchmarks/results/accelerator_<device kind>.json (and prints its tables):

  platform      backend, device kind and count, jax/jaxlib versions, XLA_FLAGS as left by
                `import dwa_jax`
  engine        for ConvNet-128 at 32 px and ResNet-18 at 224 px, batch (classes) 10 and 100,
                P = recover.batches_per_device in 1, 2, 4, 8, DWA and SRe2L, each in a process
                of its own: compile seconds, programs compiled (the adjustment and the iteration
                block: 1 each), s/iteration and image-iterations/s after warm-up, and the peak
                device memory (`memory_stats()['peak_bytes_in_use']`); a configuration that
                does not fit is recorded as such. Highest priority first; once the time budget
                is spent, the rest is recorded as skipped.
  precision     one DWA group (ResNet-18 CIFAR stem, 32 px, batch 10) in float32 as JAX runs it
                by default, recover.precision=bfloat16, and `jax_default_matmul_precision`
                'highest': s/iteration, final CE and BN loss, the Δθ-survival figure recorded
                per batch (weight space, for the arithmetic assumed), and measured on this
                device: the effect of Δθ on the teacher's logits, split and direct, against
                the 'highest' one (cosine, norm ratio; averaged over 16 dithered inputs)
  scan_vs_unrolled  the same group with the ascent and the iterations scanned and unrolled:
                the largest pixel and CE differences
  repeat        the same group run twice: whether the bytes are equal
  checkpoint    seconds per in-flight save of a ResNet-18 group at 224 px
  training      squeeze and relabel steps (ResNet-18 CIFAR stem, batch 128, 32 px JPEG files)
                with 0 and 4 input-pipeline workers: images/s; and evaluation images/s

    python benchmarks/accelerator_check.py [--budget_s 300] [--out FILE]
    python benchmarks/accelerator_check.py --quick   # the plumbing on the CPU, tiny sizes

GPU memory: the children run with XLA_PYTHON_CLIENT_PREALLOCATE=false, so that the peak is
what the program uses and not JAX's default preallocation of 75 %.
"""

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- children

def _teacher(name: str, size: int, classes: int):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dwa_jax.models import build_model  # pylint: disable=g-import-not-at-top
  model = build_model(name, classes)
  variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, size, size, 3), np.float32))
  return model, variables


def _group(runner, classes: int, size: int, seed: int = 0):
  """A group of `runner.size` batches: random normalised starting images, its draws."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dwa_jax import recover  # pylint: disable=g-import-not-at-top
  cfg = runner.cfg
  keys = [jax.random.split(recover.batch_key(seed, i, 0)) for i in range(runner.size)]
  x = np.stack([np.asarray(jax.random.normal(k[0], (classes, size, size, 3))) for k in keys])
  labels = np.tile(np.arange(classes), (runner.size, 1))
  draws = [recover.batch_draws(seed, i, 0, cfg, (size, size)) for i in range(runner.size)]
  return x, labels, [k[1] for k in keys], draws


def _timed_blocks(runner, group, spec):
  """`spec['blocks']` blocks of `spec['block']` iterations (one compiled program, warm):
  the last block's metrics and the seconds per iteration."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(group.state.x)
  started = time.perf_counter()
  for _ in range(spec["blocks"]):
    metrics = runner.advance(group, spec["block"])
  return metrics, (time.perf_counter() - started) / (spec["block"] * spec["blocks"])


def _peak_bytes():
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def engine_child(spec: dict) -> dict:
  """One engine configuration: compile, warm up, time `spec['iterations']` iterations."""
  import jax  # pylint: disable=g-import-not-at-top
  from dwa_jax import device_dispatch, recover  # pylint: disable=g-import-not-at-top
  model, variables = _teacher(spec["model"], spec["size"],
                              1000 if spec["model"] == "resnet18" else spec["classes"])
  cfg = recover.synthesis_config(_recover_config(spec), spec["method"], jax.default_backend())
  runner = device_dispatch.GroupRunner(model, variables, (spec["size"], spec["size"], 3), MEAN, STD, cfg,
                               jax.devices()[:1], spec["P"])
  x, labels, keys, draws = _group(runner, spec["classes"], spec["size"])
  started = time.perf_counter()
  group, _ = runner.start(x, labels, keys, draws)
  runner.advance(group, spec["block"])  # compiles the iteration block
  compile_seconds = time.perf_counter() - started
  metrics, seconds = _timed_blocks(runner, group, spec)
  return {"compile_seconds": round(compile_seconds, 2), "compilations": runner.compilations(),
          "seconds_per_iteration": seconds,
          "image_iterations_per_second": round(spec["classes"] * spec["P"] / seconds, 1),
          "final_ce": float(metrics[0]["ce"][-1]), "peak_device_bytes": _peak_bytes()}


def _recover_config(spec: dict):
  from dwa_jax import presets  # pylint: disable=g-import-not-at-top
  c = presets.imagenet() if spec["model"] == "resnet18" else presets.cifar("cifar10", model="convnet")
  c = presets.resolve(c)
  rc = c.recover
  rc.iterations = spec["block"] * (spec["blocks"] + 1)
  rc.checkpoint_every = spec["block"]
  rc.precision = spec.get("precision", "float32")
  if "delta_form" in spec:
    rc.delta_form = spec["delta_form"]
  if spec.get("adjust_steps"):
    rc.adjust_steps = spec["adjust_steps"]
  return rc


def precision_child(spec: dict) -> dict:
  """float32 (default arithmetic), bfloat16 and 'highest' on one DWA group; the logit effect
  of Δθ, split and direct, against the 'highest' one on this device."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dwa_jax import device_dispatch, recover, synthesis  # pylint: disable=g-import-not-at-top
  size, classes = spec["size"], spec["classes"]
  model, variables = _teacher(spec["model"], size, classes)
  out = {}
  for name, precision, matmul in (("float32", "float32", None), ("bfloat16", "bfloat16", None),
                                  ("highest", "float32", "highest")):
    with jax.default_matmul_precision(matmul):
      cfg = recover.synthesis_config(_recover_config({**spec, "precision": precision}), "dwa",
                                     jax.default_backend())
      runner = device_dispatch.GroupRunner(model, variables, (size, size, 3), MEAN, STD, cfg,
                                   jax.devices()[:1], 1)
      x, labels, keys, draws = _group(runner, classes, size)
      group, start = runner.start(x, labels, keys, draws)
      runner.advance(group, spec["block"])
      metrics, seconds = _timed_blocks(runner, group, spec)
    m = metrics[0]
    out[name] = {"seconds_per_iteration": seconds, "final_ce": float(m["ce"][-1]),
                 "final_bn_loss": float(recover.weighted_bn_loss(m["bn_terms"][-1],
                                                                 cfg.first_bn_weight)),
                 "delta_form": cfg.delta_form, "weight_bits": cfg.weight_bits,
                 "delta_cosine": float(start[0]["delta_cosine"]),
                 "delta_norm_ratio": float(start[0]["delta_norm_ratio"])}
  # The effect of a Δθ of norm rho on the logits, as this device computes it.
  paths = synthesis.bn_layer_paths(model, variables, (size, size, 3))
  delta = synthesis.random_weight_adjustment(jax.random.key(0), variables["params"], 0.015)
  x0 = jax.random.normal(jax.random.key(1), (classes, size, size, 3))

  cases = {"reference": ("highest", "direct", None), "float32_direct": (None, "direct", None),
           "float32_split": (None, "split", None), "bfloat16_direct": (None, "direct", "bfloat16"),
           "bfloat16_split": (None, "split", "bfloat16")}
  effects = {}
  for key, (matmul, form, dtype) in cases.items():
    with jax.default_matmul_precision(matmul):  # traced here, so compiled with this precision
      f = lambda d, x, form=form, dtype=dtype: synthesis.forward_with_bn_stats(
          model, variables["params"], variables["batch_stats"], x, paths, dtype, d, form)[0]
      effects[key] = jax.jit(lambda x, f=f: f(delta, x) - f(None, x)).lower(x0).compile()
  sums = {}
  for k in range(16 if spec["size"] > 16 else 4):
    x = x0 + 0.01 * jax.random.normal(jax.random.key(100 + k), x0.shape)
    for key, effect in effects.items():
      sums[key] = sums.get(key, 0) + np.asarray(effect(x), np.float64)
  ref = sums.pop("reference").ravel()
  out["logit_effect"] = {k: {"cosine": float(v.ravel() @ ref / np.linalg.norm(v) / np.linalg.norm(ref)),
                             "norm_ratio": float(np.linalg.norm(v) / np.linalg.norm(ref))}
                         for k, v in sums.items()}
  return out


def consistency_child(spec: dict) -> dict:
  """scan vs unrolled, the same group twice, and the seconds of an in-flight save."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dwa_jax import device_dispatch, recover  # pylint: disable=g-import-not-at-top
  from dwa_jax import progress as progress_lib  # pylint: disable=g-import-not-at-top
  size, classes = spec["size"], spec["classes"]
  model, variables = _teacher(spec["model"], size, classes)
  cfg = recover.synthesis_config(_recover_config(spec), "dwa", jax.default_backend())
  runs = {}
  for name, unroll in (("scan", False), ("unrolled", True), ("scan_again", False)):
    runner = device_dispatch.GroupRunner(model, variables, (size, size, 3), MEAN, STD, cfg,
                                 jax.devices()[:1], 1, unroll=unroll)
    group, _ = runner.start(*_group(runner, classes, size))
    metrics = runner.advance(group, spec["block"] * spec["blocks"])
    runs[name] = (group.x(0), np.asarray(metrics[0]["ce"]))
  out = {"scan_vs_unrolled": {
            "max_abs_pixel_difference": float(np.abs(runs["scan"][0] - runs["unrolled"][0]).max()),
            "max_abs_ce_difference": float(np.abs(runs["scan"][1] - runs["unrolled"][1]).max())},
         "repeat": {"bytes_equal": runs["scan"][0].tobytes() == runs["scan_again"][0].tobytes(),
                    "max_abs_pixel_difference": float(np.abs(runs["scan"][0]
                                                             - runs["scan_again"][0]).max())}}
  # An in-flight save of a group at the checkpoint size (ResNet-18 at 224 px, batch 100 in full).
  model, variables = _teacher(spec["save_model"], spec["save_size"], 1000)
  runner = device_dispatch.GroupRunner(model, variables, (spec["save_size"],) * 2 + (3,), MEAN, STD,
                               cfg, jax.devices()[:1], 1)
  group, _ = runner.start(*_group(runner, spec["save_classes"], spec["save_size"]))
  with tempfile.TemporaryDirectory() as tmp:
    store = progress_lib.Progress(pathlib.Path(tmp) / "progress", {"check": 1})
    seconds = []
    for _ in range(3):
      started = time.perf_counter()
      size_bytes = store.save_inflight("0:0/1", group.state)
      seconds.append(time.perf_counter() - started)
  out["checkpoint"] = {"megabytes": round(size_bytes / 2**20, 1),
                       "seconds_per_save": round(sorted(seconds)[1], 3)}
  return out


def training_child(spec: dict) -> dict:
  """squeeze and relabel steps at batch `batch` over JPEG files, 0 and N pipeline workers;
  evaluation images/s."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from dwa_jax import (data, data_parallel, input_pipeline, presets, relabel, squeeze,  # pylint: disable=g-import-not-at-top
                       train_lib, train_loop)
  from dwa_jax.models import build_model  # pylint: disable=g-import-not-at-top
  size, n, batch = spec["size"], spec["images"], spec["batch"]
  rng = np.random.default_rng(0)
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    paths = []
    for i in range(n):
      path = pathlib.Path(tmp) / f"{i:05d}.jpg"
      Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(path, quality=90)
      paths.append(path)
    images, labels = data.FileImages(paths), (np.arange(n) % 10).astype(np.int32)
    layout = data_parallel.Layout(data_parallel.data_mesh(jax.devices()), False)
    teacher = build_model(spec["model"], 10)
    teacher_vars = teacher.init(jax.random.key(1), np.zeros((1, size, size, 3), np.float32))
    c = presets.cifar("cifar10", model=spec["model"])
    for workers in spec["workers"]:
      pipeline = input_pipeline.PipelineConfig(workers=workers)
      for stage in ("squeeze", "relabel"):
        recipe = c.teacher if stage == "squeeze" else c.relabel
        recipe.batch_size = batch
        if stage == "squeeze":
          prepare, loss, aux = (squeeze.teacher_input("crop_flip", MEAN, STD),
                                squeeze.cross_entropy, None)
        else:
          prepare = relabel.student_input(c.relabel, (teacher,), MEAN, STD, 10)
          loss, aux = relabel.student_loss(c.relabel), (teacher_vars,)
        trainer = train_loop.Trainer(build_model(spec["model"], 10), recipe, prepare=prepare,
                                     loss=loss, mean=MEAN, std=STD, layout=layout,
                                     pipeline=pipeline)
        out[f"{stage}.workers{workers}"] = train_loop.time_steps(
            trainer, images, labels, steps=spec["steps"], aux=aux)
      accuracy = train_lib.make_accuracy_fn(teacher, MEAN, STD, layout, pipeline=pipeline)
      accuracy(teacher_vars, images, labels)  # compiles
      started = time.perf_counter()
      accuracy(teacher_vars, images, labels)
      out[f"evaluation.workers{workers}"] = {"images_per_second":
                                             round(n / (time.perf_counter() - started), 1)}
  return out


CHILDREN = {"engine": engine_child, "precision": precision_child,
            "consistency": consistency_child, "training": training_child}


# ----------------------------------------------------------------------------- parent

def run_child(kind: str, spec: dict, timeout: float) -> dict:
  """`kind` in a process of its own (its own device memory and peak); a failure or an
  out-of-memory becomes a record, not an abort."""
  env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  started = time.perf_counter()
  try:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(spec)],
                          cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=max(timeout, 10))
  except subprocess.TimeoutExpired:
    return {"skipped": f"did not finish within {timeout:.0f} s"}
  wall = round(time.perf_counter() - started, 1)
  if proc.returncode != 0:
    tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
    oom = re.search(r"RESOURCE_EXHAUSTED|[Oo]ut of memory", proc.stderr)
    return {"skipped": "does not fit in device memory" if oom else f"failed: {tail[0][:300]}",
            "wall_seconds": wall}
  return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_seconds": wall}


def engine_specs(quick: bool) -> list[dict]:
  """Engine configurations, most informative first (the budget cuts the tail)."""
  models = [("resnet18", 224, 10, 2), ("convnet", 32, 20, 3)]  # model, size, block, blocks
  batches, packs = (100, 10), (1, 2, 4, 8)
  if quick:  # one program of each kind per P; K = 2 (the unrolled ascent is most of a compile)
    return [{"model": "convnet", "size": 16, "classes": 10, "P": p, "method": method,
             "block": 4, "blocks": 2, "adjust_steps": 2} for p, method in ((1, "dwa"), (2, "sre2l"))]
  specs = []
  for p in packs:
    for model, size, block, blocks in models:
      for batch in batches:
        for method in ("dwa", "sre2l"):
          specs.append({"model": model, "size": size, "classes": batch, "P": p,
                        "method": method, "block": block, "blocks": blocks})
  return specs


def device_kind() -> tuple[str, dict]:
  import dwa_jax  # pylint: disable=unused-import,g-import-not-at-top  (its XLA options first)
  import jax  # pylint: disable=g-import-not-at-top
  from dwa_jax import provenance  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", device.platform) or device.platform
  info = {"backend": jax.default_backend(), "device_kind": kind, "devices": jax.device_count(),
          "xla_flags_after_import": os.environ.get("XLA_FLAGS", ""),
          "provenance": provenance.record()}
  return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_") or "unknown", info


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes: the plumbing on a CPU")
  parser.add_argument("--budget_s", type=float, default=300.0,
                      help="stop starting engine configurations after this many seconds")
  parser.add_argument("--out", default="", help="default: benchmarks/results/"
                      "accelerator_<device kind>.json")
  parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    import dwa_jax  # pylint: disable=unused-import,g-import-not-at-top
    print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1])), default=float))
    return
  started = time.perf_counter()
  kind, result = device_kind()
  print(f"{result['backend']}: {result['device_kind']} x {result['devices']}", flush=True)
  q = args.quick
  small = {"model": "convnet" if q else "resnet18_cifar", "size": 16 if q else 32,
           "classes": 10, "block": 2 if q else 10, "blocks": 2 if q else 3,
           "adjust_steps": 2 if q else 0}  # 0: the preset's K
  remaining = lambda: args.budget_s - (time.perf_counter() - started)
  result["precision"] = run_child("precision", small, 600)
  print("precision:", json.dumps(result["precision"]), flush=True)
  result.update(run_child("consistency", {
      **small, "save_model": "convnet" if q else "resnet18", "save_size": 16 if q else 224,
      "save_classes": 10 if q else 100}, 600))
  result["training"] = run_child("training", {
      "model": "convnet" if q else "resnet18_cifar", "size": 16 if q else 32,
      "images": 64 if q else 1024, "batch": 16 if q else 128, "steps": 2 if q else 5,
      "workers": (0, 1) if q else (0, 4)}, 600)
  print("training:", json.dumps(result["training"]), flush=True)
  result["engine"] = {}
  for spec in engine_specs(q):
    key = f"{spec['model']}.b{spec['classes']}.P{spec['P']}.{spec['method']}"
    if remaining() <= 0:
      result["engine"][key] = {"skipped": "time budget spent"}
      continue
    result["engine"][key] = row = run_child("engine", spec, max(remaining(), 60))
    print(f"{key:32s} {json.dumps(row)}", flush=True)
  result["total_seconds"] = round(time.perf_counter() - started, 1)
  out = pathlib.Path(args.out or REPO / "benchmarks" / "results" / f"accelerator_{kind}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1, default=float) + "\n")
  print_tables(result)
  print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out.name}")


def print_tables(result: dict) -> None:
  print("\n| engine | s/iteration | image-it/s | compile s | programs | peak MB |")
  print("|---|---|---|---|---|---|")
  for key, row in result["engine"].items():
    if "skipped" in row:
      print(f"| {key} | {row['skipped']} | | | | |")
      continue
    peak = row.get("peak_device_bytes")
    print(f"| {key} | {row['seconds_per_iteration']:.4f} | {row['image_iterations_per_second']} "
          f"| {row['compile_seconds']} | {row['compilations']} | "
          f"{'—' if peak is None else round(peak / 2**20)} |")
  precision = result.get("precision", {})
  if "float32" in precision:
    print("\n| arithmetic | s/iteration | final CE | final BN loss | Δθ form | Δθ cosine | norm ratio |")
    print("|---|---|---|---|---|---|---|")
    for name in ("float32", "bfloat16", "highest"):
      r = precision[name]
      print(f"| {name} | {r['seconds_per_iteration']:.4f} | {r['final_ce']:.4f} | "
            f"{r['final_bn_loss']:.4f} | {r['delta_form']} | {r['delta_cosine']:.4f} | "
            f"{r['delta_norm_ratio']:.3f} |")
    print("\nΔθ's effect on the logits against 'highest' (16 dithered inputs): " + ", ".join(
        f"{k} cos {v['cosine']:.3f}" for k, v in precision["logit_effect"].items()))


if __name__ == "__main__":
  main()
