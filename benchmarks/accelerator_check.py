"""What one GPU (or TPU host) does with dwa_jax, measured in one wall-clock budget (480 s).

Writes benchmarks/results/accelerator_<device kind>.json, rewritten (atomically) after every
section and every row, so a run stopped at any point keeps what it finished; `sections` holds
each section's status and seconds, `sections_done` the finished ones in order, `total_seconds`
the time so far. Sections, most valuable first (once the budget is spent, the rest is recorded
as `{"skipped": "time budget spent"}`):

  platform      backend, device kind and count, versions, XLA_FLAGS as left by `import dwa_jax`
  engine        ResNet-18 at 224 px, batch (classes) 100, P = 1: SRe2L, DWA with Δθ applied
                directly and split, in float32 and recover.precision=bfloat16, one process per
                row: compile seconds, programs compiled (the adjustment and the iteration block:
                1 each), s/iteration and image-iterations/s after warm-up, final CE, peak device
                memory (`memory_stats()['peak_bytes_in_use']`), or that it does not fit
  memory        XLA's memory analysis (`GroupRunner.compile_stats`, compiled for this device,
                nothing run) of one synthesis iteration and of the K = 15 ascent, scanned and
                unrolled, split and direct, ResNet-18 at 224 px, batch 100
  demo          the digits demo end to end through the CLI (`python -m dwa_jax.main
                --config=configs/demo_digits.py`): seconds per stage (from metrics.jsonl's wall
                times; squeeze includes the process start) and the final accuracies
  precision     one DWA group (ResNet-18 CIFAR stem, 32 px, batch 10) in float32 as JAX runs it
                by default, recover.precision=bfloat16, and `jax_default_matmul_precision`
                'highest': s/iteration, final CE and BN loss, the Δθ-survival figure recorded
                per batch (weight space), and measured on this device: the effect of Δθ on the
                teacher's logits, split and direct, against the 'highest' one
  consistency   the same group scanned and unrolled (largest pixel and CE differences), run
                twice (bytes equal or not), and the seconds of an in-flight save of a ResNet-18
                group at 224 px
  training      squeeze and relabel steps (ResNet-18 CIFAR stem, batch 128, 32 px JPEG files)
                with 0 and 4 input-pipeline workers: images/s; evaluation images/s
  engine_more   the rest of the engine table: ConvNet-128 at 32 px and ResNet-18 at 224 px,
                batch 10 and 100, P = 1, 2, 4, 8, DWA (Δθ direct, as auto runs it) and SRe2L

Every timing covers at least --min_seconds of work (2 s; 0.2 s with --quick). Each section runs
in a process of its own (each engine row too), with XLA_PYTHON_CLIENT_PREALLOCATE=false and
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (the peak is what the program uses, up to 95 % of the
memory); on a TPU host, where a child cannot open the chips while the parent holds them, all in
this process (the peak is then the running one). The children share one persistent compilation
cache (JAX_COMPILATION_CACHE_DIR, a temporary folder unless set).

    python benchmarks/accelerator_check.py [--budget_s 480] [--sections engine,memory] [--out FILE]
    python benchmarks/accelerator_check.py --quick   # the plumbing on the CPU, tiny sizes, K = 2
"""

import argparse
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ROW, RESULT = "@row ", "@result "  # a child's stdout lines the parent reads
SECTIONS = ("engine", "memory", "demo", "precision", "consistency", "training", "engine_more")
SPENT = {"skipped": "time budget spent"}
REFUSAL = ("accelerator_check: the backend is the CPU; it measures a GPU or TPU (--quick runs its "
           "plumbing on the CPU with tiny sizes)")


# ----------------------------------------------------------------------------- children

def _teacher(name: str, size: int, classes: int):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dwa_jax.models import build_model  # pylint: disable=g-import-not-at-top
  model = build_model(name, 1000 if name == "resnet18" else classes)
  variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, size, size, 3), np.float32))
  return model, variables


def _recover_config(spec: dict):
  from dwa_jax import presets  # pylint: disable=g-import-not-at-top
  c = presets.imagenet() if spec["model"] == "resnet18" else presets.cifar("cifar10", model="convnet")
  rc = presets.resolve(c).recover
  # The preset's draws (2000 iterations) cover the timed blocks; the ascent compiles as in a run.
  rc.iterations = max(rc.iterations, spec.get("block", 1) * (spec.get("blocks", 1) + 1))
  rc.precision = spec.get("precision", "float32")
  rc.delta_form = spec.get("delta_form", "auto")
  if spec.get("adjust_steps"):
    rc.adjust_steps = spec["adjust_steps"]
  return rc


def _runner(model, variables, spec: dict, method: str = "dwa", p: int = 1, unroll=None):
  import jax  # pylint: disable=g-import-not-at-top
  from dwa_jax import device_dispatch, recover  # pylint: disable=g-import-not-at-top
  cfg = recover.synthesis_config(_recover_config(spec), method, jax.default_backend())
  size = spec["size"]
  return device_dispatch.GroupRunner(model, variables, (size, size, 3), MEAN, STD, cfg,
                                     jax.devices()[:1], p, unroll=unroll)


def _group(runner, classes: int, size: int, seed: int = 0):
  """A group of `runner.size` batches: random normalised starting images, its draws."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dwa_jax import recover  # pylint: disable=g-import-not-at-top
  keys = [jax.random.split(recover.batch_key(seed, i, 0)) for i in range(runner.size)]
  x = np.stack([np.asarray(jax.random.normal(k[0], (classes, size, size, 3))) for k in keys])
  labels = np.tile(np.arange(classes), (runner.size, 1))
  draws = [recover.batch_draws(seed, i, 0, runner.cfg, (size, size)) for i in range(runner.size)]
  return x, labels, [k[1] for k in keys], draws


def _timed_blocks(runner, group, spec):
  """`spec['blocks']` blocks of `spec['block']` iterations (one compiled program, warm), then
  more until `spec['min_seconds']` have passed: the metrics after the first `blocks` (the same
  iterations whatever the speed), seconds per iteration, and what was timed."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(group.state.x)
  block, limit = spec["block"], runner.cfg.iterations // spec["block"] - 1  # draws left
  done, started = 0, time.perf_counter()
  while done < spec["blocks"] or (time.perf_counter() - started < spec["min_seconds"]
                                  and done < limit):
    metrics = runner.advance(group, block)  # numpy metrics: waits for the block
    done += 1
    if done == spec["blocks"]:
      first = metrics
  seconds = time.perf_counter() - started
  return first, seconds / (block * done), {"timed_iterations": block * done,
                                           "timed_seconds": round(seconds, 3)}


def _peak_bytes():
  import jax  # pylint: disable=g-import-not-at-top
  return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def engine_child(spec: dict, emit) -> dict:
  """One engine configuration: compile, warm up, time at least `spec['blocks']` blocks."""
  del emit
  model, variables = _teacher(spec["model"], spec["size"], spec["classes"])
  runner = _runner(model, variables, spec, spec["method"], spec["P"])
  started = time.perf_counter()
  group, _ = runner.start(*_group(runner, spec["classes"], spec["size"]))
  runner.advance(group, spec["block"])  # compiles the iteration block
  compile_seconds = time.perf_counter() - started
  metrics, seconds, timed = _timed_blocks(runner, group, spec)
  return {"compile_seconds": round(compile_seconds, 2), "compilations": runner.compilations(),
          "seconds_per_iteration": seconds,
          "image_iterations_per_second": round(spec["classes"] * spec["P"] / seconds, 1),
          **timed, "final_ce": float(metrics[0]["ce"][-1]), "peak_device_bytes": _peak_bytes(),
          "delta_form": runner.cfg.delta_form if spec["method"] == "dwa" else None,
          "precision": spec.get("precision", "float32")}


def memory_child(spec: dict, emit) -> dict:
  """XLA's memory analysis of one iteration and of the K-step ascent, scanned and unrolled,
  split and direct, as compiled for this device; each program emitted as it compiles."""
  model, variables = _teacher(spec["model"], spec["size"], spec["classes"])
  image, k = (spec["size"], spec["size"], 3), _recover_config(spec).adjust_steps
  rows = {}
  for name, form, unroll, steps in (
      ("iteration.split", "split", False, 1), (f"ascent.scan.split.K{k}", "split", False, None),
      ("iteration.direct", "direct", False, 1), (f"ascent.scan.direct.K{k}", "direct", False, None),
      (f"ascent.unrolled.split.K{k}", "split", True, None),
      (f"ascent.unrolled.direct.K{k}", "direct", True, None)):
    runner = _runner(model, variables, {**spec, "delta_form": form}, unroll=unroll)
    rows[name] = runner.compile_stats(spec["classes"], image, steps)
    emit(name, rows[name])
  return {"scan_ascent_temp_over_iteration": {
      form: round(rows[f"ascent.scan.{form}.K{k}"]["temp_bytes"]
                  / max(rows[f"iteration.{form}"]["temp_bytes"], 1), 3)
      for form in ("split", "direct")}}


def precision_child(spec: dict, emit) -> dict:
  """float32 (default arithmetic), bfloat16 and 'highest' on one DWA group; the logit effect
  of Δθ, split and direct, against the 'highest' one on this device."""
  del emit
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dwa_jax import recover, synthesis  # pylint: disable=g-import-not-at-top
  size, classes = spec["size"], spec["classes"]
  model, variables = _teacher(spec["model"], size, classes)
  out = {}
  for name, precision, matmul in (("float32", "float32", None), ("bfloat16", "bfloat16", None),
                                  ("highest", "float32", "highest")):
    with jax.default_matmul_precision(matmul):
      runner = _runner(model, variables, {**spec, "precision": precision})
      group, start = runner.start(*_group(runner, classes, size))
      runner.advance(group, spec["block"])
      metrics, seconds, timed = _timed_blocks(runner, group, spec)
    m, cfg = metrics[0], runner.cfg
    out[name] = {"seconds_per_iteration": seconds, **timed, "final_ce": float(m["ce"][-1]),
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
  for k in range(16 if size > 16 else 4):
    x = x0 + 0.01 * jax.random.normal(jax.random.key(100 + k), x0.shape)
    for key, effect in effects.items():
      sums[key] = sums.get(key, 0) + np.asarray(effect(x), np.float64)
  ref = sums.pop("reference").ravel()
  out["logit_effect"] = {k: {"cosine": float(v.ravel() @ ref / np.linalg.norm(v) / np.linalg.norm(ref)),
                             "norm_ratio": float(np.linalg.norm(v) / np.linalg.norm(ref))}
                         for k, v in sums.items()}
  return out


def consistency_child(spec: dict, emit) -> dict:
  """scan vs unrolled, the same group twice, and the seconds of an in-flight save."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dwa_jax import progress as progress_lib  # pylint: disable=g-import-not-at-top
  size, classes = spec["size"], spec["classes"]
  model, variables = _teacher(spec["model"], size, classes)
  runs = {}
  for name, unroll in (("scan", False), ("unrolled", True), ("scan_again", False)):
    runner = _runner(model, variables, spec, unroll=unroll)
    group, _ = runner.start(*_group(runner, classes, size))
    metrics = runner.advance(group, spec["block"] * spec["blocks"])
    runs[name] = (group.x(0), np.asarray(metrics[0]["ce"]))
  emit("scan_vs_unrolled", {
      "max_abs_pixel_difference": float(np.abs(runs["scan"][0] - runs["unrolled"][0]).max()),
      "max_abs_ce_difference": float(np.abs(runs["scan"][1] - runs["unrolled"][1]).max())})
  emit("repeat", {"bytes_equal": runs["scan"][0].tobytes() == runs["scan_again"][0].tobytes(),
                  "max_abs_pixel_difference": float(np.abs(runs["scan"][0]
                                                           - runs["scan_again"][0]).max())})
  # An in-flight save of a group at the checkpoint size (ResNet-18 at 224 px, batch 100 in full).
  save = {**spec, "model": spec["save_model"], "size": spec["save_size"]}
  model, variables = _teacher(save["model"], save["size"], spec["save_classes"])
  runner = _runner(model, variables, save)
  group, _ = runner.start(*_group(runner, spec["save_classes"], save["size"]))
  with tempfile.TemporaryDirectory() as tmp:
    store = progress_lib.Progress(pathlib.Path(tmp) / "progress", {"check": 1})
    seconds = []
    for _ in range(3):
      started = time.perf_counter()
      size_bytes = store.save_inflight("0:0/1", group.state)
      seconds.append(time.perf_counter() - started)
  return {"checkpoint": {"megabytes": round(size_bytes / 2**20, 1),
                         "seconds_per_save": round(sorted(seconds)[1], 3)}}


def training_child(spec: dict, emit) -> dict:
  """squeeze and relabel steps at batch `batch` over JPEG files, 0 and N pipeline workers;
  evaluation images/s. Each emitted as measured."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from dwa_jax import (data, data_parallel, input_pipeline, presets, relabel, squeeze,  # pylint: disable=g-import-not-at-top
                       train_lib, train_loop)
  from dwa_jax.models import build_model  # pylint: disable=g-import-not-at-top
  size, n, batch, min_seconds = spec["size"], spec["images"], spec["batch"], spec["min_seconds"]
  rng = np.random.default_rng(0)
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
        steps = spec["steps"]
        for _ in range(3):  # more steps until they cover min_seconds (the step compiles once)
          row = train_loop.time_steps(trainer, images, labels, steps=steps, aux=aux)
          if steps / row["steps_per_second"] >= min_seconds:
            break
          steps = int(1.2 * min_seconds * row["steps_per_second"]) + 1
        emit(f"{stage}.workers{workers}", {**row, "steps": steps})
      accuracy = train_lib.make_accuracy_fn(teacher, MEAN, STD, layout, pipeline=pipeline)
      accuracy(teacher_vars, images, labels)  # compiles
      passes, started = 0, time.perf_counter()
      while not passes or time.perf_counter() - started < min_seconds:
        accuracy(teacher_vars, images, labels)
        passes += 1
      emit(f"evaluation.workers{workers}", {
          "images_per_second": round(n * passes / (time.perf_counter() - started), 1),
          "passes": passes})
  return {}


def platform_child(spec: dict, emit) -> dict:
  """The backend and device, probed in a child so this process does not hold the device."""
  del emit
  import jax  # pylint: disable=g-import-not-at-top
  from dwa_jax import provenance  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return {"backend": jax.default_backend(),
          "device_kind": getattr(device, "device_kind", device.platform) or device.platform,
          "devices": jax.device_count(), "xla_flags_after_import": os.environ.get("XLA_FLAGS", ""),
          "provenance": provenance.record(spec["argv"])}


CHILDREN = {"engine": engine_child, "memory": memory_child, "precision": precision_child,
            "consistency": consistency_child, "training": training_child,
            "platform": platform_child}


# ----------------------------------------------------------------------------- running them

class _TimedOut(Exception):
  pass


def _failure(stderr: str, code) -> dict:
  if re.search(r"RESOURCE_EXHAUSTED|[Oo]ut of memory", stderr):
    return {"failed": "does not fit in device memory"}
  tail = stderr.strip().splitlines()[-1:] or [f"exit {code}"]
  return {"failed": tail[0][:300]}


def _popen(command: list, timeout: float, on_line=None) -> tuple:
  """Runs `command`, passing each stdout line to `on_line` as it comes, killed after `timeout`
  seconds: (exit status, stderr, whether it was killed)."""
  with tempfile.TemporaryFile("w+") as err:
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
    killed = []
    timer = threading.Timer(timeout, lambda: (killed.append(1), proc.kill()))
    timer.start()
    try:
      for line in proc.stdout:
        if on_line:
          on_line(line)
      proc.wait()
    finally:
      timer.cancel()
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    err.seek(0)
    return proc.returncode, err.read(), bool(killed)


def _in_process(work, timeout: float) -> dict:
  """`work()` here, interrupted (between Python steps) after `timeout` seconds; a failure
  becomes a record."""
  def alarm(*_):
    raise _TimedOut()
  previous = signal.signal(signal.SIGALRM, alarm)
  signal.setitimer(signal.ITIMER_REAL, max(timeout, 0.01))
  try:
    return work()
  except _TimedOut:
    return {"timed_out": f"stopped after {timeout:.0f} s: time budget spent"}
  except Exception as e:  # pylint: disable=broad-except
    return _failure(f"{type(e).__name__}: {e}", 1)
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def run_child(kind: str, spec: dict, timeout: float, emit, here: bool) -> dict:
  """`kind` in a process of its own (its own device memory and peak), or in this one (`here`);
  what it emits arrives as it comes. A failure, an out-of-memory or the timeout becomes a
  record, not an abort."""
  started = time.perf_counter()
  if here:
    out = _in_process(lambda: CHILDREN[kind](spec, emit), timeout)
  else:
    result = []

    def on_line(line):
      if line.startswith(ROW):
        emit(*json.loads(line[len(ROW):]))
      elif line.startswith(RESULT):
        result.append(json.loads(line[len(RESULT):]))
    code, stderr, killed = _popen([sys.executable, __file__, "--child", kind, json.dumps(spec)],
                                  timeout, on_line)
    if killed:
      out = {"timed_out": f"killed after {timeout:.0f} s: time budget spent"}
    else:
      out = result[0] if code == 0 and result else _failure(stderr, code)
  return {**out, "wall_seconds": round(time.perf_counter() - started, 1)}


def demo_overrides(quick: bool) -> dict:
  return {"teacher.epochs": 1, "recover.iterations": 4, "ipc": 1, "relabel.epochs": 1,
          "relabel.eval_every": 1, "relabel.seeds": (0,)} if quick else {}


def run_demo(spec: dict, timeout: float, here: bool) -> dict:
  """The digits demo through the CLI (here: through `main.execute`): seconds per stage, as
  metrics.jsonl's wall times divide the run, and the final accuracies."""
  flags = [f"--config.{k}={str(v).replace(' ', '')}" for k, v in spec["overrides"].items()]
  command = ["-m", "dwa_jax.main", "--config=configs/demo_digits.py", "--workdir=DIR", *flags]
  out = {"command": " ".join(["python", *command])}
  with tempfile.TemporaryDirectory() as tmp:
    workdir = pathlib.Path(tmp) / "demo"
    started = time.time()
    if here:
      def work():
        from dwa_jax import main as main_lib, presets  # pylint: disable=g-import-not-at-top
        config = presets.demo_digits()
        config.update_from_flattened_dict(spec["overrides"])
        code = main_lib.execute(config, workdir)
        return {} if code == 0 else {"failed": f"exit {code}"}
      failure = _in_process(work, timeout)
    else:
      code, stderr, killed = _popen(
          [sys.executable, *[f"--workdir={workdir}" if a == "--workdir=DIR" else a
                             for a in command]], timeout)
      failure = ({"timed_out": f"killed after {timeout:.0f} s: time budget spent"} if killed
                 else {} if code == 0 else _failure(stderr, code))
    finished = time.time()
    out.update(failure, seconds=round(finished - started, 1))
    log = workdir / "metrics.jsonl"
    ends = {}  # each stage's last record, in the order the stages ran
    for line in log.read_text().splitlines() if log.exists() else ():
      record = json.loads(line)
      parts = record["stage"].split("/")
      ends["/".join(parts[:2]) if parts[0] == "recover" else parts[0]] = record["time"]
    if not failure and "relabel" in ends:
      ends["relabel"] = finished  # relabel's results are written after its last record
    out["stage_seconds"], last = {}, started
    for stage, end in ends.items():
      out["stage_seconds"][stage], last = round(end - last, 1), end
    if (workdir / "results.json").exists():
      results = json.loads((workdir / "results.json").read_text())
      out["teacher_test_accuracy"] = results["teacher_test_accuracy"]
      out["sets"] = {name: {k: r[k] for k in ("final_mean", "final_std", "best_mean", "best_std")}
                     for name, r in results["sets"].items()}
  return out


# ----------------------------------------------------------------------------- the plan

def engine_rows(quick: bool, min_seconds: float) -> tuple[list, list]:
  """(engine, engine_more): [(key, spec)], most informative first."""
  if quick:  # one program of each kind per row; K = 2 (the unrolled ascent is most of a compile)
    base = {"model": "convnet", "size": 16, "classes": 10, "block": 4, "blocks": 2,
            "adjust_steps": 2, "min_seconds": min_seconds}
    first = [("convnet.b10.P1.dwa.direct.float32",
              {**base, "P": 1, "method": "dwa", "delta_form": "direct", "precision": "float32"}),
             ("convnet.b10.P1.dwa.split.bfloat16",
              {**base, "P": 1, "method": "dwa", "delta_form": "split", "precision": "bfloat16"})]
    return first, [("convnet.b10.P2.sre2l", {**base, "P": 2, "method": "sre2l"})]
  resnet = {"model": "resnet18", "size": 224, "block": 10, "blocks": 2, "min_seconds": min_seconds}
  first = []  # DWA as auto runs it (direct) first, then SRe2L, then the split form and bfloat16
  for method, form, precision in (("dwa", "direct", "float32"), ("sre2l", None, "float32"),
                                  ("dwa", "split", "float32"), ("dwa", "direct", "bfloat16"),
                                  ("sre2l", None, "bfloat16"), ("dwa", "split", "bfloat16")):
    key = ".".join(filter(None, ("resnet18.b100.P1", method, form, precision)))
    first.append((key, {**resnet, "classes": 100, "P": 1, "method": method, "precision": precision,
                        **({"delta_form": form} if form else {})}))
  more = []
  for p in (1, 2, 4, 8):
    for model, size, block, blocks in (("resnet18", 224, 10, 2), ("convnet", 32, 20, 3)):
      for batch in (100, 10):
        for method in ("dwa", "sre2l"):
          if (model, batch, p) != ("resnet18", 100, 1):
            more.append((f"{model}.b{batch}.P{p}.{method}", {
                "model": model, "size": size, "classes": batch, "P": p, "method": method,
                "block": block, "blocks": blocks, "min_seconds": min_seconds}))
  return first, more


def plan(quick: bool, min_seconds: float) -> dict:
  """Each section: a list of engine rows, or (child kind, spec)."""
  q = quick
  small = {"model": "convnet" if q else "resnet18_cifar", "size": 16 if q else 32,
           "classes": 10, "block": 2 if q else 10, "blocks": 2 if q else 3,
           "adjust_steps": 2 if q else 0, "min_seconds": min_seconds}  # 0: the preset's K
  first, more = engine_rows(q, min_seconds)
  return {
      "engine": first,
      "memory": ("memory", {"model": "convnet" if q else "resnet18", "size": 16 if q else 224,
                            "classes": 10 if q else 100, "adjust_steps": 2 if q else 0}),
      "demo": ("demo", {"overrides": demo_overrides(q)}),
      "precision": ("precision", small),
      "consistency": ("consistency", {**small, "save_model": "convnet" if q else "resnet18",
                                      "save_size": 16 if q else 224,
                                      "save_classes": 10 if q else 100}),
      "training": ("training", {"model": "convnet" if q else "resnet18_cifar",
                                "size": 16 if q else 32, "images": 64 if q else 1024,
                                "batch": 16 if q else 128, "steps": 2 if q else 5,
                                "workers": (0, 1) if q else (0, 4), "min_seconds": min_seconds}),
      "engine_more": more,
  }


class Report:
  """The results JSON, rewritten atomically after every section and row."""

  def __init__(self, out: pathlib.Path, started: float, budget_s: float, data: dict):
    self.out, self.started, self.budget_s, self.data = out, started, budget_s, data

  def remaining(self) -> float:
    return self.budget_s - (time.perf_counter() - self.started)

  def save(self) -> None:
    from dwa_jax import files  # pylint: disable=g-import-not-at-top
    self.data["total_seconds"] = round(time.perf_counter() - self.started, 1)
    self.out.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(self.out, self.data)  # atomically: a kill leaves the last whole file


def run_section(report: Report, name: str, work, here: bool) -> str:
  """One section into report.data[name]; returns its status."""
  section = report.data[name] = {}

  def emit(key, value):
    section[key] = value
    report.save()
    print(f"  {name}.{key}: {json.dumps(value, default=float)}", flush=True)

  if isinstance(work, list):  # engine rows, each in a process of its own
    for key, spec in work:
      emit(key, run_child("engine", spec, report.remaining(), None, here)
           if report.remaining() > 1 else dict(SPENT))
    cut = [r for r in section.values() if "skipped" in r or "timed_out" in r]
    return "done" if not cut else "skipped" if len(cut) == len(section) else "cut by the budget"
  if report.remaining() <= 1:
    section.update(SPENT)
    return "skipped"
  kind, spec = work
  if kind == "demo":
    section.update(run_demo(spec, report.remaining(), here))
  else:
    section.update(run_child(kind, spec, report.remaining(), emit, here))
  return next((k for k in ("timed_out", "failed") if k in section), "done")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes: the plumbing on a CPU")
  parser.add_argument("--budget_s", type=float, default=480.0,
                      help="wall-clock seconds for everything; later sections are skipped")
  parser.add_argument("--min_seconds", type=float, default=None,
                      help="seconds of work each timing covers at least (2; 0.2 with --quick)")
  parser.add_argument("--sections", default=",".join(SECTIONS),
                      help="which sections, comma-separated (run in the fixed order)")
  parser.add_argument("--in_process", action="store_true",
                      help="every section in this process, as on a TPU host")
  parser.add_argument("--out", default="", help="default: benchmarks/results/"
                      "accelerator_<device kind>.json")
  parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    import dwa_jax  # pylint: disable=unused-import,g-import-not-at-top  (its XLA options first)
    emit = lambda key, value: print(ROW + json.dumps([key, value], default=float), flush=True)
    out = CHILDREN[args.child[0]](json.loads(args.child[1]), emit)
    print(RESULT + json.dumps(out, default=float), flush=True)
    return
  if not args.quick and os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
    print(REFUSAL, file=sys.stderr)
    sys.exit(2)
  unknown = set(args.sections.split(",")) - set(SECTIONS)
  if unknown:
    parser.error(f"--sections: unknown {sorted(unknown)}; choose from {','.join(SECTIONS)}")
  # A SIGTERM unwinds (the running child is killed on the way out); the JSON is on disk.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  # The children's environment (the parent's too, on a TPU host): set before JAX starts.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if not cache:  # fresh: a compile second measured is a compilation, not a load
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dwa_jax_xla_cache_")
  try:
    check(args, argv, cache)
  finally:
    if not cache:
      shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def check(args, argv, cache) -> None:
  """The sections, into the JSON."""
  started = time.perf_counter()
  # The platform from a child: this process must not hold a TPU its children need.
  info = run_child("platform", {"argv": sys.argv if argv is None else [__file__, *argv]},
                   max(args.budget_s, 30), None, False)
  info.pop("wall_seconds", None)
  if "backend" not in info:
    print(f"accelerator_check: probing the platform failed: {info}", file=sys.stderr)
    sys.exit(1)
  if info["backend"] == "cpu" and not args.quick:
    print(REFUSAL, file=sys.stderr)
    sys.exit(2)
  here = args.in_process or info["backend"] == "tpu"
  min_seconds = args.min_seconds if args.min_seconds is not None else 0.2 if args.quick else 2.0
  kind = re.sub(r"[^a-z0-9]+", "_", info["device_kind"].lower()).strip("_") or "unknown"
  out = pathlib.Path(args.out or REPO / "benchmarks" / "results" / f"accelerator_{kind}.json")
  print(f"{info['backend']}: {info['device_kind']} x {info['devices']}", flush=True)
  chosen = [s for s in SECTIONS if s in args.sections.split(",")]
  report = Report(out, started, args.budget_s, {
      **info, "budget_s": args.budget_s, "min_seconds": min_seconds, "quick": args.quick,
      "processes": "one" if here else "one per section and engine row",
      "compilation_cache": "JAX_COMPILATION_CACHE_DIR" if cache else "a fresh folder for this run",
      "sections": {s: {"status": "pending"} for s in chosen}, "sections_done": []})
  report.save()
  work = plan(args.quick, min_seconds)
  if here:
    import dwa_jax  # pylint: disable=unused-import,g-import-not-at-top
  for name in chosen:
    report.data["sections"][name] = {"status": "running"}
    report.save()
    section_started = time.perf_counter()
    status = run_section(report, name, work[name], here)
    report.data["sections"][name] = {
        "status": status, "seconds": round(time.perf_counter() - section_started, 1)}
    if status == "done":
      report.data["sections_done"].append(name)
    report.save()  # then the log: what it says finished is on disk
    print(f"section {name}: {status} ({report.data['sections'][name]['seconds']} s)", flush=True)
  print_tables(report.data)
  print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out.name} "
        f"in {report.data['total_seconds']} s")


def print_tables(result: dict) -> None:
  rows = {**result.get("engine", {}), **result.get("engine_more", {})}
  if rows:
    print("\n| engine | s/iteration | image-it/s | compile s | programs | peak MB |")
    print("|---|---|---|---|---|---|")
  for key, row in rows.items():
    if "seconds_per_iteration" not in row:
      print(f"| {key} | {next(iter(row.values()))} | | | | |")
      continue
    peak = row.get("peak_device_bytes")
    print(f"| {key} | {row['seconds_per_iteration']:.4f} | {row['image_iterations_per_second']} "
          f"| {row['compile_seconds']} | {row['compilations']} | "
          f"{'—' if peak is None else round(peak / 2**20)} |")
  programs = {k: v for k, v in result.get("memory", {}).items() if isinstance(v, dict) and "temp_bytes" in v}
  if programs:
    print("\n| program | temp MB | argument MB | compile s |\n|---|---|---|---|")
    for key, r in programs.items():
      print(f"| {key} | {r['temp_bytes'] / 2**20:.0f} | {r['argument_bytes'] / 2**20:.0f} | "
            f"{r['compile_seconds']} |")
  demo = result.get("demo", {})
  if "stage_seconds" in demo:
    print(f"\ndemo: {demo['stage_seconds']} s; " + ", ".join(
        f"{k} {v['final_mean']:.2f}" for k, v in demo.get("sets", {}).items()))
  precision = result.get("precision", {})
  if "float32" in precision:
    print("\n| arithmetic | s/iteration | final CE | final BN loss | Δθ form | Δθ cosine | norm ratio |")
    print("|---|---|---|---|---|---|---|")
    for name in ("float32", "bfloat16", "highest"):
      r = precision[name]
      print(f"| {name} | {r['seconds_per_iteration']:.4f} | {r['final_ce']:.4f} | "
            f"{r['final_bn_loss']:.4f} | {r['delta_form']} | {r['delta_cosine']:.4f} | "
            f"{r['delta_norm_ratio']:.3f} |")
    print("\nΔθ's effect on the logits against 'highest': " + ", ".join(
        f"{k} cos {v['cosine']:.3f}" for k, v in precision["logit_effect"].items()))


if __name__ == "__main__":
  main()
