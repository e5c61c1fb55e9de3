"""Speed of the recover engine on this machine: seconds per synthesis iteration and more.

For ResNet-18 (CIFAR stem) at batch 100 (CIFAR-100) and batch 10 (CIFAR-10):
  * seconds per iteration: median over timed calls of one jitted block of ITERATION_BLOCK unrolled
    iterations (>= 20 iterations in all), after warm-up, divided by the block size;
  * GFLOP/s from XLA's cost analysis of that iteration, and its fraction of a measured fp32
    matmul peak (a large jnp.dot timed the same way);
  * the DWA adjustment (K ascent passes, once per batch), and DWA's whole-batch overhead over
    SRe2L, (time(DWA batch) − time(SRe2L batch)) / time(SRe2L batch), against K/T;
  * if torch is importable, in the same run: our PyTorch loop of the same iteration (forward with
    BN-input hooks, the loss, backward to the pixels only) and the authors' loop as they run it
    (backward also computes every teacher weight gradient, SPEC.md), and both speed ratios.
Then a device-scaling table: 1/2/4/8 forced CPU devices (subprocesses), a small ConvNet, one batch
per device, one program per host: every count >= 2 gives bit-identical images, 1 device the same
within float32 rounding (correctness; on a 2-core CPU the throughput cannot scale). And a packing
table (`--packing-only` alone, merged into the JSON): recover.batches_per_device P = 1, 2, 4, 8
at batch 10 and 100 (ResNet-18): images/s, programs compiled, XLA's cost analysis, and whether
the images match P = 1 (key `packing`, batch 10; `packing_by_batch`).

With --compare-stock the engine is timed again in a child process with XLA's stock CPU options
(DWA_JAX_XLA_DEFAULTS=0, see dwa_jax/xla_cpu.py), to show what the tuned options buy.

  python benchmarks/recover_speed.py [--quick] [--compare-stock] [--out FILE.json]
"""

import argparse
import hashlib
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import numpy as np



def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_peak_gflops(repeats: int) -> float:
  import jax
  import jax.numpy as jnp
  n = 2048
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  dot = jax.jit(lambda a: a @ a)
  seconds = median_seconds(lambda: dot(a).block_until_ready(), repeats)
  return 2 * n**3 / seconds / 1e9


def teacher(num_classes: int, image_size: int = 32, model_name: str = "resnet18_cifar"):
  import jax
  import jax.numpy as jnp
  from dwa_jax.models import build_model
  model = build_model(model_name, num_classes)
  variables = model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
  return model, variables


def jax_method(batch: int, method: str, iterations: int = 1000, adjust_steps: int = 12):
  """The recover stage's program for `method` (GroupRunner on one device: what the stage runs),
  ResNet-18 with the CIFAR stem at 32 px, `batch` classes. Returns (run, info): run() advances
  one block of ITERATION_BLOCK iterations and waits for it (restarting the batch before the
  schedule's end); info holds the iteration's FLOPs (XLA's cost analysis) and, for DWA, the
  seconds of the weight adjustment (median of 3 after a compiling one)."""
  import jax
  from dwa_jax import device_dispatch, recover, synthesis  # pylint: disable=g-import-not-at-top
  model, variables = teacher(batch)
  cfg = synthesis.SynthesisConfig(method=method, iterations=iterations, adjust_steps=adjust_steps,
                                r_var=1.0 if method == "sre2l" else 11.0)
  runner = device_dispatch.GroupRunner(model, variables, (32, 32, 3), (0.5,) * 3, (0.25,) * 3, cfg,
                               jax.devices()[:1], 1)
  keys = jax.random.split(recover.batch_key(0, 0, 0))
  inputs = (np.asarray(jax.random.normal(keys[0], (1, batch, 32, 32, 3))), np.arange(batch)[None],
            [keys[1]], [recover.batch_draws(0, 0, 0, cfg, (32, 32))])
  block = device_dispatch.ITERATION_BLOCK
  holder = {"group": runner.start(*inputs)[0]}

  def start():
    holder["group"] = runner.start(*inputs)[0]
    jax.block_until_ready(holder["group"].state.x)

  def run():
    if holder["group"].t + block > iterations:
      start()
    runner.advance(holder["group"], block)  # returns host metrics: the block has finished

  run()  # compiles
  info = {"gflop_per_iteration": runner.cost_analysis(holder["group"], block)["flops"] / block / 1e9,
          "adjust_seconds": median_seconds(start, 3, warmup=1) if method == "dwa" else 0.0}
  return run, info


def torch_loop(batch: int, weight_grads: bool = False):
  """One synthesis iteration in PyTorch, as a callable (None without torch): BN-input hooks,
  CE + BN loss, backward, Adam on the pixels. weight_grads=False: our loop, backward to the
  pixels only (the fair comparison with the engine, which computes no weight gradients).
  weight_grads=True: the authors' loop as they run it, where the teacher's parameters keep
  requires_grad and backward also computes every weight gradient (SPEC.md)."""
  try:
    import torch
    import torchvision
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count() or 1)
  net = torchvision.models.resnet18(num_classes=batch)
  net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
  net.maxpool = torch.nn.Identity()
  net.eval()
  for p in net.parameters():
    p.requires_grad_(weight_grads)
  terms = []

  def hook(module, inputs, _):
    x = inputs[0]
    mean = x.mean([0, 2, 3])
    var = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1).var(1, unbiased=False)
    terms.append(torch.norm(module.running_var - var) + torch.norm(module.running_mean - mean))

  for m in net.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.register_forward_hook(hook)
  x = torch.randn(batch, 3, 32, 32, requires_grad=True)
  opt = torch.optim.Adam([x], lr=0.25, betas=(0.5, 0.9))
  labels = torch.arange(batch)

  def iteration():
    terms.clear()
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(net(torch.roll(x, (1, 2), (2, 3))), labels)
    loss = loss + 0.01 * (10 * terms[0] + sum(terms[1:]))
    loss.backward()
    opt.step()

  iteration()
  return iteration


def spread(values) -> dict:
  """median, min and max of a list of per-round values."""
  return {"median": statistics.median(values), "min": min(values), "max": max(values),
          "rounds": [round(v, 5) for v in values]}


def interleaved(batch: int, rounds: int, iterations_per_round: int) -> dict:
  """SRe2L and DWA iterations of the engine, our PyTorch loop and the authors' loop, timed in
  turns: each round times every method once over the same number of iterations, in an order
  that reverses every round (JAX, torch, authors', ..., then back), so that a slower or busier
  stretch of the machine falls on every method alike. Also the matmul peak each round.
  Returns per-method seconds per iteration (median, min-max over rounds), and per-round ratios."""
  runs, info = {}, {}
  for method in ("sre2l", "dwa"):
    runs[method], info[method] = jax_method(batch, method)
  for name, grads in (("torch_loop", False), ("authors_loop", True)):
    loop = torch_loop(batch, grads)
    if loop is not None:
      runs[name] = loop
  block = 4  # device_dispatch.ITERATION_BLOCK
  calls = {name: max(1, iterations_per_round // block) if name in ("sre2l", "dwa")
           else iterations_per_round for name in runs}
  per_iteration = {name: [] for name in runs}
  peaks = []
  order = list(runs)
  for r in range(rounds):
    peaks.append(matmul_peak_gflops(3))
    for name in (order if r % 2 == 0 else order[::-1]):
      started = time.perf_counter()
      for _ in range(calls[name]):
        runs[name]()
      done = calls[name] * (block if name in ("sre2l", "dwa") else 1)
      per_iteration[name].append((time.perf_counter() - started) / done)
  out = {"seconds_per_iteration": {n: spread(v) for n, v in per_iteration.items()},
         "matmul_peak_gflops": spread(peaks), "engine": info}
  ratios = {}
  dwa = per_iteration["dwa"]
  ratios["dwa_vs_sre2l"] = spread([d / s for d, s in zip(dwa, per_iteration["sre2l"])])
  for name, key in (("authors_loop", "dwa_vs_authors_loop"), ("torch_loop", "dwa_vs_torch_loop")):
    if name in per_iteration:
      ratios[key] = spread([o / d for o, d in zip(per_iteration[name], dwa)])
      ratios["sre2l" + key[3:]] = spread([o / s for o, s in zip(per_iteration[name],
                                                                 per_iteration["sre2l"])])
  out["ratios"] = ratios
  for method in ("sre2l", "dwa"):
    seconds = out["seconds_per_iteration"][method]["median"]
    flops = info[method]["gflop_per_iteration"]
    info[method]["gflops"] = flops / seconds
    info[method]["percent_of_matmul_peak"] = 100 * flops / seconds / out["matmul_peak_gflops"]["median"]
  return out


def iteration_parts(batch: int, repeats: int) -> dict:
  """Where a DWA iteration's time goes (ResNet-18, CIFAR stem, the direct θ + Δθ the CPU runs):
  the teacher's forward with the loss (CE + BN matching), the backward to the pixels, each as its
  own jitted program (median of `repeats`), with XLA's FLOPs; and the same parts of the PyTorch
  loops (forward, backward to the pixels, backward with every weight gradient)."""
  import jax
  import jax.numpy as jnp
  from dwa_jax import recover, synthesis  # pylint: disable=g-import-not-at-top
  model, variables = teacher(batch)
  cfg = synthesis.SynthesisConfig(method="dwa")
  bn_paths = synthesis.bn_layer_paths(model, variables, (32, 32, 3))
  labels = jnp.arange(batch)
  x = jax.random.normal(jax.random.key(1), (batch, 32, 32, 3))
  draws = recover.batch_draws(0, 0, 0, cfg, (32, 32))
  state, _ = jax.jit(lambda v, x: synthesis.start_batch(model, v, x, labels, jax.random.key(0),
                                                      draws, bn_paths=bn_paths, cfg=cfg))(
                                                          variables, x)
  weights = state.weights
  layer_w = synthesis.bn_layer_weights(len(bn_paths), cfg.first_bn_weight)
  loss = lambda x: synthesis.synthesis_loss(model, weights, variables["batch_stats"],
                                          jnp.roll(x, (1, 2), (1, 2)), labels, bn_paths, layer_w,
                                          cfg)[0]
  out = {}
  for name, fn in (("forward", jax.jit(loss)), ("forward_backward", jax.jit(jax.grad(loss)))):
    seconds = median_seconds(lambda fn=fn: jax.block_until_ready(fn(x)), repeats)
    flops = fn.lower(x).compile().cost_analysis()["flops"] / 1e9
    out[name] = {"seconds": seconds, "gflop": flops, "gflops": flops / seconds}
  out["backward"] = {k: out["forward_backward"][k] - out["forward"][k] for k in ("seconds", "gflop")}
  out["backward"]["gflops"] = out["backward"]["gflop"] / out["backward"]["seconds"]
  try:
    import torch
    import torchvision
  except ImportError:
    return out
  net = torchvision.models.resnet18(num_classes=batch)
  net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
  net.maxpool = torch.nn.Identity()
  net.eval()
  xt = torch.randn(batch, 3, 32, 32, requires_grad=True)
  labels_t = torch.arange(batch)
  forward = lambda: torch.nn.functional.cross_entropy(net(torch.roll(xt, (1, 2), (2, 3))), labels_t)
  for p in net.parameters():
    p.requires_grad_(False)
  with torch.no_grad():
    out["torch_forward"] = {"seconds": median_seconds(forward, repeats)}
  out["torch_forward_backward"] = {"seconds": median_seconds(lambda: forward().backward(), repeats)}
  for p in net.parameters():
    p.requires_grad_(True)
  out["torch_forward_backward_weights"] = {
      "seconds": median_seconds(lambda: forward().backward(), repeats)}
  return out


def scaling_child(n_devices: int) -> None:
  """Runs in a subprocess with n forced devices: one tiny batch per device, prints JSON."""
  import jax
  from dwa_jax import device_dispatch, recover, synthesis  # pylint: disable=g-import-not-at-top
  from dwa_jax.models.convnet import ConvNet
  import jax.numpy as jnp
  model = ConvNet(10, width=32, depth=2)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  cfg = synthesis.SynthesisConfig(iterations=20, adjust_steps=4, jitter=2)
  runner = device_dispatch.GroupRunner(model, variables, (16, 16, 3), (0.5,) * 3, (0.25,) * 3, cfg,
                               jax.devices()[:n_devices])
  groups = 8 // n_devices  # the same 8 batches whatever the device count
  images = []
  start_time = time.perf_counter()
  for g in range(groups):
    ids = range(g * n_devices, (g + 1) * n_devices)
    keys = [jax.random.split(recover.batch_key(0, i, 0)) for i in ids]
    draws = [recover.batch_draws(0, i, 0, cfg, (16, 16)) for i in ids]
    x0 = jnp.stack([jax.random.normal(k[0], (10, 16, 16, 3)) for k in keys])
    labels = jnp.tile(jnp.arange(10), (n_devices, 1))
    group, _ = runner.start(x0, labels, [k[1] for k in keys], draws)
    runner.advance(group, cfg.iterations)
    images += [group.x(k) for k in range(group.count)]
  seconds = time.perf_counter() - start_time
  images = np.stack(images)
  np.save(os.environ["DWA_SCALING_OUT"], images)
  print(json.dumps({"devices": n_devices, "seconds": seconds, "batches_per_s": 8 / seconds,
                    "sha256": hashlib.sha256(images.tobytes()).hexdigest(),
                    "compilations": runner.compilations()}))


# "The same images" as P = 1: float32 pixels (normalised units) within a tenth of one 8-bit
# level (1 / 255 / std, std ~0.25: 0.016), i.e. float32 rounding, not another result.
PACKING_ATOL = 1e-3


def packing_table(batch: int, per_device_values=(1, 2, 4, 8), iterations: int = 8,
                  model_name: str = "resnet18_cifar") -> list[dict]:
  """recover.batches_per_device = P on this host's devices: P independent batches of `batch`
  images per device in one program. Per P: images per second of synthesis (iterations after a
  warm-up group), programs compiled, XLA's cost analysis of the iteration program (per block of
  ITERATION_BLOCK unrolled iterations on CPU), and whether batch 0 comes out the same as at
  P = 1 (max |difference| <= PACKING_ATOL)."""
  import jax
  from dwa_jax import device_dispatch, recover, synthesis  # pylint: disable=g-import-not-at-top
  model, variables = teacher(batch, model_name=model_name)
  devices = jax.local_devices()
  cfg = synthesis.SynthesisConfig(iterations=iterations, adjust_steps=2, jitter=2)
  labels_one = np.arange(batch)
  rows, first = [], None
  for per_device in per_device_values:
    runner = device_dispatch.GroupRunner(model, variables, (32, 32, 3), (0.5,) * 3, (0.25,) * 3, cfg,
                                 devices, per_device)
    n = runner.size
    keys = [jax.random.split(recover.batch_key(0, i, 0)) for i in range(n)]
    x0 = np.stack([np.asarray(jax.random.normal(k[0], (batch, 32, 32, 3))) for k in keys])
    draws = [recover.batch_draws(0, i, 0, cfg, (32, 32)) for i in range(n)]
    args = (x0, np.tile(labels_one, (n, 1)), [k[1] for k in keys], draws)

    def run_group():
      group, _ = runner.start(*args)
      runner.advance(group, iterations)
      return group

    run_group()  # compiles
    start_time = time.perf_counter()
    group = run_group()
    jax.block_until_ready(group.state.x)
    seconds = time.perf_counter() - start_time
    images = group.x(0)
    first = images if first is None else first
    compiled = runner.compilations()
    cost = runner.cost_analysis(group, device_dispatch.ITERATION_BLOCK if runner.unroll
                                else iterations)
    difference = float(np.abs(images - first).max())
    rows.append({"batches_per_device": per_device, "devices": len(devices), "batch": batch,
                 "images_per_second": n * batch * iterations / seconds,
                 "seconds_per_group": seconds, "compilations": sum(compiled.values()),
                 "programs": compiled, "same_images": difference <= PACKING_ATOL,
                 "max_abs_difference": difference, "cost_analysis": cost})
  return rows


def child_json(args: list[str], env: dict, timeout: float):
  """Runs this script with `args` in a child process; returns the JSON of its last output line."""
  proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True,
                        text=True, timeout=timeout, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def stock_engine(batch: int, rounds: int, iterations_per_round: int) -> dict:
  """The engine's SRe2L and DWA iterations, timed in a child process that runs with XLA's stock
  CPU options (what the tuned ones in dwa_jax/xla_cpu.py buy)."""
  from dwa_jax import xla_cpu
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env[xla_cpu.OPT_OUT] = "0"
  return child_json(["--engine-child", json.dumps([batch, rounds, iterations_per_round])],
                    env, timeout=3600)


def engine_only(batch: int, rounds: int, iterations_per_round: int) -> dict:
  """SRe2L and DWA iterations in turns (as `interleaved`, without PyTorch)."""
  runs = {method: jax_method(batch, method)[0] for method in ("sre2l", "dwa")}
  seconds = {method: [] for method in runs}
  calls = max(1, iterations_per_round // 4)
  for r in range(rounds):
    for method in (("sre2l", "dwa") if r % 2 == 0 else ("dwa", "sre2l")):
      started = time.perf_counter()
      for _ in range(calls):
        runs[method]()
      seconds[method].append((time.perf_counter() - started) / (4 * calls))
  return {method: spread(v) for method, v in seconds.items()}


def scaling_table(counts=(1, 2, 4, 8)) -> list[dict]:
  """The same 8 batches on 1, 2, 4 and 8 forced devices (one program per host): bit-identical
  for every count >= 2 (one partitioned program), within float32 rounding of 1 device."""
  import tempfile
  from dwa_jax import xla_cpu
  rows, images = [], {}
  with tempfile.TemporaryDirectory() as tmp:
    for n in counts:
      # Stock XLA options, as the tests run.
      out = pathlib.Path(tmp) / f"{n}.npy"
      env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
             xla_cpu.OPT_OUT: "0", "DWA_SCALING_OUT": str(out)}
      rows.append(child_json(["--scaling-child", str(n)], env, timeout=900))
      images[n] = np.load(out)
  for row in rows:
    n = row["devices"]
    row["bit_identical_to_2_devices"] = bool(np.array_equal(images[n], images[2]))
    row["max_abs_difference_to_1_device"] = float(np.abs(images[n] - images[1]).max())
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
  parser.add_argument("--compare-stock", action="store_true",
                      help="also time the engine with XLA's stock CPU options (child process)")
  parser.add_argument("--out", default="benchmarks/results/recover_speed.json")
  parser.add_argument("--packing-only", action="store_true",
                      help="only the batches_per_device table, merged into --out's other keys")
  parser.add_argument("--scaling-child", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--engine-child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  import dwa_jax  # pylint: disable=unused-import  (applies the tuned XLA options before JAX starts)
  from dwa_jax import provenance  # pylint: disable=g-import-not-at-top
  if args.scaling_child:
    return scaling_child(args.scaling_child)
  if args.engine_child:
    print(json.dumps(engine_only(*json.loads(args.engine_child))))
    return None

  import jax
  if args.packing_only or args.quick:
    packing = {}
    for batch in (10,) if args.quick else (10, 100):
      packing[batch] = packing_table(batch, (1, 2) if args.quick else (1, 2, 4, 8),
                                     iterations=4 if args.quick else 8,
                                     model_name="convnet" if args.quick else "resnet18_cifar")
    print_packing(packing)
    if args.packing_only:
      out = pathlib.Path(args.out)
      results = json.loads(out.read_text()) if out.exists() else {}
      results["packing"] = packing[10]  # CIFAR-10's batch (the issue's key), and per batch:
      results["packing_by_batch"] = packing
      results["packing_backend"] = jax.default_backend()
      results["packing_provenance"] = provenance.record()
      out.write_text(json.dumps(results, indent=1, default=float) + "\n")
      print(f"wrote {out}")
      return None
  rounds = 2 if args.quick else 7
  batches = (10,) if args.quick else (100, 10)
  per_round = {10: 12 if args.quick else 40, 100: 8}
  print(f"jax {jax.__version__} on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; {rounds} interleaved rounds")
  results = {"provenance": provenance.record(),
             "jax": jax.__version__, "cpu_count": os.cpu_count(), "rounds": rounds,
             "xla_flags": os.environ.get("XLA_FLAGS", ""), "by_batch": {},
             "engine_stock_xla": {}}
  for batch in batches:
    row = interleaved(batch, rounds, per_round[batch])
    row["parts"] = iteration_parts(batch, 3 if args.quick else 10)
    if args.compare_stock:
      results["engine_stock_xla"][batch] = stock_engine(batch, rounds, per_round[batch])
    results["by_batch"][batch] = row
    print_batch(batch, row)
  if not any("authors_loop" in r["seconds_per_iteration"] for r in results["by_batch"].values()):
    print("torch not importable here: no PyTorch comparison")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  if args.quick:
    results["packing"] = packing[10]
  elif out.exists():  # the packing tables come from their own run (--packing-only): keep them
    previous = json.loads(out.read_text())
    results.update({k: v for k, v in previous.items() if k.startswith("packing")})
  write_results(out, results)  # the timings are kept if the scaling table fails
  rows = scaling_table((1, 2) if args.quick else (1, 2, 4, 8))
  results["scaling"] = rows
  print(f"\n{'devices':>7} {'seconds':>8} {'batches/s':>9} {'= 2 devices':>11} "
        f"{'max |Δ| to 1 device':>19}  (stock XLA options)")
  for row in rows:
    print(f"{row['devices']:>7} {row['seconds']:>8.2f} {row['batches_per_s']:>9.2f} "
          f"{str(row['bit_identical_to_2_devices']):>11} "
          f"{row['max_abs_difference_to_1_device']:>19.3g}")
  write_results(out, results)


def print_batch(batch: int, row: dict) -> None:
  """The batch's table: seconds per iteration (median, min-max), and DWA's speed-up."""
  seconds, ratios = row["seconds_per_iteration"], row["ratios"]
  peak = row["matmul_peak_gflops"]
  print(f"\nbatch {batch}: matmul peak {peak['median']:.0f} GFLOP/s "
        f"({peak['min']:.0f}-{peak['max']:.0f})")
  print("| method | s/iteration (median) | min-max | GFLOP/s | % of peak |")
  print("|---|---|---|---|---|")
  for name, s in seconds.items():
    engine = row["engine"].get(name, {})
    extra = (f"{engine['gflops']:.0f} | {engine['percent_of_matmul_peak']:.0f} %" if engine
             else "| ")
    print(f"| {name} | {s['median']:.4f} | {s['min']:.4f}-{s['max']:.4f} | {extra} |")
  for key, r in ratios.items():
    print(f"{key}: {r['median']:.3f}x ({r['min']:.3f}-{r['max']:.3f})")
  parts = row["parts"]
  print("parts (s): " + ", ".join(f"{k} {v['seconds']:.4f}" for k, v in parts.items()))


def write_results(out: pathlib.Path, results: dict) -> None:
  out.write_text(json.dumps(results, indent=1, default=float) + "\n")
  print(f"wrote {out}")


def print_packing(packing: dict) -> None:
  print(f"\n{'batch':>5} {'P':>3} {'devices':>7} {'images/s':>9} {'compiled':>8} "
        f"{'GFLOP/block':>11} {'same images':>11}  (recover.batches_per_device)")
  for batch, rows in packing.items():
    for row in rows:
      flops = row["cost_analysis"].get("flops", float("nan")) / 1e9
      print(f"{batch:>5} {row['batches_per_device']:>3} {row['devices']:>7} "
            f"{row['images_per_second']:>9.1f} {row['compilations']:>8} {flops:>11.2f} "
            f"{str(row['same_images']):>11}")


if __name__ == "__main__":
  main()
