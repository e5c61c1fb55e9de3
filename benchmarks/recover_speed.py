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

SPEC_TORCH_SECONDS = {100: 1.19, 10: 0.146}  # authors' code, fp32, 2 threads (SPEC.md, measured)


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


def time_engine(batch: int, iterations: int, adjust_steps: int, repeats: int) -> dict:
  """One jitted iteration (SRe2L and DWA share it: Δθ is fixed within a batch) and one DWA
  adjustment, each timed as a median; whole-batch costs follow from them."""
  import jax
  import jax.numpy as jnp
  from dwa_jax import recover
  model, variables = teacher(batch)
  mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
  bn_paths = recover.bn_layer_paths(model, variables, (32, 32, 3))
  x = jax.random.normal(jax.random.key(1), (batch, 32, 32, 3))
  labels = jnp.arange(batch)
  key = jax.random.key(2)
  out = {}
  for method in ("sre2l", "dwa"):
    cfg = recover.SynthesisConfig(method=method, iterations=iterations, adjust_steps=adjust_steps,
                                  r_var=1.0 if method == "sre2l" else 11.0)
    offsets = recover.draw_jitter_offsets(key, iterations, cfg.jitter)
    start = jax.jit(lambda v, x: recover.start_batch(model, v, x, labels, key, offsets,
                                                     bn_paths=bn_paths, cfg=cfg))
    block = recover.ITERATION_BLOCK  # as make_synthesizer and the recover stage run them
    step = jax.jit(lambda v, s: recover.run_iterations(
        model, v, s, labels, key, offsets, block, bn_paths=bn_paths, pixel_mean=mean,
        pixel_std=std, cfg=cfg, unroll=True))
    state, _ = start(variables, x)
    flops = step.lower(variables, state).compile().cost_analysis()["flops"] / block
    holder = {"s": state}

    def one_block():
      holder["s"], m = step(variables, holder["s"])
      jax.block_until_ready(m)

    # Median over blocks of `block` iterations, per iteration.
    seconds = median_seconds(one_block, max(5, -(-repeats // block))) / block
    adjust = 0.0
    if method == "dwa":
      adjust = median_seconds(lambda: jax.block_until_ready(start(variables, x)),
                              max(3, repeats // 5))
    out[method] = {"seconds_per_iteration": seconds, "gflop_per_iteration": flops / 1e9,
                   "gflops": flops / 1e9 / seconds, "adjust_seconds": adjust}
  it = out["sre2l"]["seconds_per_iteration"]
  dwa_batch = out["dwa"]["adjust_seconds"] + iterations * out["dwa"]["seconds_per_iteration"]
  out["dwa_overhead"] = dwa_batch / (iterations * it) - 1
  # The adjustment's share alone: DWA and SRe2L iterations run the same program (Δθ is added once
  # per block), so their measured difference is timing noise.
  out["adjust_share"] = out["dwa"]["adjust_seconds"] / (iterations * it)
  out["k_over_t"] = adjust_steps / iterations
  return out


def time_torch(batch: int, repeats: int, weight_grads: bool = False) -> float | None:
  """One synthesis iteration in PyTorch: BN-input hooks, CE + BN loss, backward, Adam on the
  pixels. weight_grads=False: our loop, backward to the pixels only (the fair comparison with
  the engine, which computes no weight gradients). weight_grads=True: the authors' loop as they
  run it, where the teacher's parameters keep requires_grad and backward also computes every
  weight gradient (SPEC.md)."""
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

  return median_seconds(iteration, repeats)


def scaling_child(n_devices: int) -> None:
  """Runs in a subprocess with n forced devices: one tiny batch per device, prints JSON."""
  import jax
  from dwa_jax import recover
  from dwa_jax.models.convnet import ConvNet
  import jax.numpy as jnp
  model = ConvNet(10, width=32, depth=2)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  cfg = recover.SynthesisConfig(iterations=20, adjust_steps=4, jitter=2)
  runner = recover.GroupRunner(model, variables, (16, 16, 3), (0.5,) * 3, (0.25,) * 3, cfg,
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
  from dwa_jax import recover
  model, variables = teacher(batch, model_name=model_name)
  devices = jax.local_devices()
  cfg = recover.SynthesisConfig(iterations=iterations, adjust_steps=2, jitter=2)
  labels_one = np.arange(batch)
  rows, first = [], None
  for per_device in per_device_values:
    runner = recover.GroupRunner(model, variables, (32, 32, 3), (0.5,) * 3, (0.25,) * 3, cfg,
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
    cost = runner.cost_analysis(group, recover.ITERATION_BLOCK if runner.unroll else iterations)
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


def stock_engine(batch: int, iterations: int, adjust_steps: int, repeats: int) -> dict:
  """time_engine in a child process that runs with XLA's stock CPU options."""
  from dwa_jax import xla_cpu
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env[xla_cpu.OPT_OUT] = "0"
  return child_json(["--engine-child", json.dumps([batch, iterations, adjust_steps, repeats])],
                    env, timeout=3600)


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
    print(json.dumps(time_engine(*json.loads(args.engine_child))))
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
  repeats = 3 if args.quick else 20
  batches = (10,) if args.quick else (100, 10)
  iterations, k = 1000, 12
  print(f"jax {jax.__version__} on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; median of {repeats}")
  peak = matmul_peak_gflops(repeats)
  results = {"provenance": provenance.record(),
             "jax": jax.__version__, "cpu_count": os.cpu_count(), "repeats": repeats,
             "xla_flags": os.environ.get("XLA_FLAGS", ""), "matmul_peak_gflops": peak,
             "engine": {}, "engine_stock_xla": {}, "torch": {}}
  print(f"fp32 matmul peak: {peak:.0f} GFLOP/s")
  header = (f"{'batch':>5} {'method':>12} {'s/iter':>8} {'GFLOP/it':>9} {'GFLOP/s':>8} "
            f"{'%peak':>6} {'adjust s':>9} {'torch s/it':>10} {'speed-up':>8}  (torch: our loop, no weight gradients)")
  print(header)
  for batch in batches:
    runs = {"engine": time_engine(batch, iterations, k, repeats)}
    if args.compare_stock:
      runs["engine_stock_xla"] = stock_engine(batch, iterations, k, repeats)
    torch_s = time_torch(batch, repeats)
    results["torch"][batch] = torch_s
    authors_s = time_torch(batch, repeats, weight_grads=True)
    results.setdefault("torch_authors_loop", {})[batch] = authors_s
    reference = torch_s or SPEC_TORCH_SECONDS[batch]
    for kind, r in runs.items():
      results[kind][batch] = r
      for method in ("sre2l", "dwa"):
        m = r[method]
        label = method + ("" if kind == "engine" else "/stock")
        print(f"{batch:>5} {label:>12} {m['seconds_per_iteration']:>8.4f} "
              f"{m['gflop_per_iteration']:>9.2f} {m['gflops']:>8.1f} "
              f"{100 * m['gflops'] / peak:>5.1f}% {m['adjust_seconds']:>9.3f} "
              f"{reference:>9.3f}{'' if torch_s else '*'} "
              f"{reference / m['seconds_per_iteration']:>7.2f}x")
      if authors_s and kind == "engine":
        print(f"      vs the authors' loop (with weight gradients, {authors_s:.3f} s/it): "
              f"{authors_s / r['sre2l']['seconds_per_iteration']:.2f}x")
      print(f"      {kind}: DWA whole-batch overhead over SRe2L (T={iterations}, K={k}): "
            f"{100 * r['dwa_overhead']:.2f}%, of which the adjustment "
            f"{100 * r['adjust_share']:.2f}% (target <= K/T + 1% = {100 * r['k_over_t'] + 1:.2f}%)")
  if None in results["torch"].values():
    print("* torch not importable here: the authors' loop as measured in SPEC.md on this CPU kind")
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
