"""Recover: synthesise images against a frozen BatchNorm teacher (SRe2L, and DWA's directed Δθ).

Each synthetic batch (one image per class, or a chunk of classes) starts from real images or
noise and is optimised as synthesis.py describes; batches are keyed by (seed, ipc index, class
chunk) and dealt out round-robin to the processes (`owned_batches`). Progress, resume and
device counts: docs/scale-out.md. The parts live in synthesis.py (maths), device_dispatch.py,
progress.py and synthetic_outputs.py.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import auto as tqdm

from dwa_jax import (arithmetic, compat, data, files, input_pipeline, metrics_log, real_init,
                     status, teacher_store)
from dwa_jax.device_dispatch import GroupRunner, batch_groups
from dwa_jax.progress import Progress, wait_for_batches
from dwa_jax.synthesis import (SynthesisConfig, bn_layer_weights, draw_augmentation,
                               first_teacher, stack_teachers)
from dwa_jax.synthetic_outputs import write_outputs

# recover.delta_form='auto'. Where the platform rounds float32 weights (TF32 on Ampere+ GPUs,
# bfloat16 on TPUs), θ + Δθ keeps little of Δθ (weight-space cosine 0.93 and 0.50 on the saved
# CIFAR-10 teacher), yet students score DWA synthesised that way as they score exact DWA, within
# the exact run's spread (RESULTS.md, benchmarks/results/arithmetic_accuracy.json); the split
# form, which keeps Δθ, doubles an iteration's FLOPs. So every platform runs the direct form, at
# SRe2L's cost; 'split' stays a choice.
AUTO_DELTA_FORM = "direct"


def synthesis_config(rc, method: str, platform: str | None = None) -> SynthesisConfig:
  """ml_collections `config.recover` -> the engine's config for `method` (SRe2L: r_var = 1) on
  `platform` (default: JAX's default backend and its first device). recover.delta_form='auto'
  is 'direct' on every platform (AUTO_DELTA_FORM)."""
  if rc.compat_q1 is None or rc.compat_q2 is None:
    raise TypeError("recover config not resolved: pass the config through "
                    "dwa_jax.presets.resolve first")
  compute_dtype = None if rc.precision == "float32" else rc.precision
  capability = None if platform else getattr(jax.devices()[0], "compute_capability", None)
  platform_bits = arithmetic.matmul_input_bits(platform or jax.default_backend(), compute_dtype,
                                               capability)
  delta_form = AUTO_DELTA_FORM if rc.delta_form == "auto" else rc.delta_form
  return SynthesisConfig(
      method=method, iterations=rc.iterations, lr=rc.lr, r_bn=rc.r_bn,
      r_var=rc.sre2l_r_var if method == "sre2l" else rc.r_var,
      first_bn_weight=rc.first_bn_weight, adjust_steps=rc.adjust_steps, rho=rc.rho,
      jitter=rc.jitter, augment=rc.augment,
      # Q1 and Q2 are quirks of DWA's ascent; the other methods have none.
      compat_q1=bool(rc.compat_q1) and method == "dwa",
      compat_q2=bool(rc.compat_q2) and method == "dwa",
      compute_dtype=compute_dtype, delta_form=delta_form,
      platform_bits=platform_bits, emulate_bits=arithmetic.EMULATIONS[rc.emulate],
      committee=1 + len(rc.committee))


def load_committee(workdir, rc, train):
  """This workdir's teacher, stacked with those of recover.committee (squeeze workdirs, of one
  architecture and normalisation): (model, variables, meta); meta['committee'] names each."""
  committee = tuple(rc.committee)
  models, variables, metas = teacher_store.load_teachers(
      workdir, committee, train, "recover.committee", "committee members see the same pixels")
  meta = metas[0]
  if not committee:
    return models[0], variables[0], meta
  for path, other in zip(committee, metas[1:]):
    if other["model"] != meta["model"]:
      raise teacher_store.TeacherError(
          f"recover.committee: the teacher in {path} is a {other['model']}, this workdir's is a "
          f"{meta['model']}; a committee stacks teachers of one architecture.")
  described = [{"workdir": str(path), "model": m["model"], "test_accuracy": m["test_accuracy"]}
               for path, m in zip((".", *committee), metas)]
  return models[0], stack_teachers(variables), {**meta, "committee": described}


def engine_config(cfg: SynthesisConfig, num_chunks: int) -> SynthesisConfig:
  """What runs: Q2 acts only between the class-chunks of an ipc index, so with one chunk it
  changes no value, and tracking the teacher's weight gradients would only cost time."""
  return dataclasses.replace(cfg, compat_q2=False) if num_chunks == 1 else cfg


def compat_record(config, cfg: SynthesisConfig, num_classes: int) -> dict:
  """recover.json's `compat`: the mode, the switches that act outside the engine as they ran
  (the engine's Q1 and Q2 are in `synthesis`), and `no_effect`: each switch that is on but
  changed nothing in this run, with why."""
  rc, no_effect = config.recover, {}
  for name in ("compat_q1", "compat_q2"):
    if rc[name] and not getattr(cfg, name):
      no_effect[f"recover.{name}"] = (
          f"{cfg.method} has no weight-adjustment ascent" if cfg.method != "dwa" else
          f"one class chunk (recover.classes_per_batch covers all {num_classes} classes): Q2 "
          "acts only between the class chunks of an ipc index")
  if config.compat_cifar10_std and compat.dataset_family(config.dataset) != "cifar10":
    no_effect["compat_cifar10_std"] = f"applies to CIFAR-10 only, not {config.dataset}"
  cifar10_std = bool(config.compat_cifar10_std) and "compat_cifar10_std" not in no_effect
  return {"compat": config.compat, "compat_cifar10_std": cifar10_std,
          "recover.compat_jpeg": bool(rc.compat_jpeg), "no_effect": no_effect}


def init_kind(rc, method: str) -> str:
  """'real' (DWA and the random ablation) or 'noise' (SRe2L), unless the config forces one of
  them or 'scored' (teacher-scored real crops, dwa_jax/real_init.py)."""
  if rc.init in ("real", "noise", "scored"):
    return rc.init
  return "noise" if method == "sre2l" else "real"


def init_description(rc, method: str):
  """The initialisation as recorded (fingerprint, recover.json): its kind, and for 'scored' the
  selector's settings."""
  kind = init_kind(rc, method)
  if kind != "scored":
    return kind
  return {"kind": kind, **dataclasses.asdict(real_init.ScoredInit.from_config(rc))}


def initial_rows(dataset, ipc: int, seed: int, kind: str,
                 candidates: int = 1) -> np.ndarray | None:
  """'real': the (ipc, num_classes) training-image indices the batches start from,
  `data.sample_per_class(dataset, ipc, seed)` (labels only: nothing is decoded); 'scored':
  (ipc, candidates, num_classes) candidates (real_init.candidate_rows); 'noise': None."""
  if kind == "scored":
    return real_init.candidate_rows(dataset, ipc, candidates, seed)
  return data.sample_per_class(dataset, ipc, seed) if kind == "real" else None


def initial_batch(dataset, rows, ipc_index: int, classes, seed: int, mean, std,
                  dtype=np.float32, scorer=None) -> np.ndarray:
  """(len(classes), H, W, C) normalised starting images of batch (ipc_index, classes) in
  `dtype`, read when the batch starts, so no stage holds the whole starting set.

  Real (`rows` from `initial_rows`): (u8 / 255 − mean) / std, as torchvision's ToTensor +
  Normalize. Scored (3-d `rows`, `scorer` from real_init.make_scorer): per class, the crop
  real_init picks. Noise (`rows` None): N(0, 1), one draw per (ipc index, class) from
  jax.random.key(seed), so a batch's noise does not depend on which others exist.
  """
  classes = np.asarray(classes)
  if rows is not None and rows.ndim == 3:
    chosen = [scorer(np.asarray(input_pipeline.read(dataset.images, rows[ipc_index, :, c])),
                     int(c), real_init.crop_key(seed, ipc_index, int(c)))[0] for c in classes]
    return np.stack([np.asarray(x) for x in chosen]).astype(dtype)
  if rows is not None:
    mean, std = np.asarray(mean, dtype), np.asarray(std, dtype)
    pixels = input_pipeline.read(dataset.images, rows[ipc_index, classes])
    return (np.asarray(pixels).astype(dtype) / 255 - mean) / std
  key = jax.random.fold_in(jax.random.key(seed), ipc_index)
  draw = jax.vmap(lambda c: jax.random.normal(jax.random.fold_in(key, c),
                                              dataset.images.shape[1:], jnp.float32))
  return np.asarray(draw(jnp.asarray(classes))).astype(dtype)


def initial_batches(dataset, ipc: int, seed: int, kind: str, mean, std,
                    dtype=np.float32) -> np.ndarray:
  """Every batch's starting images, (ipc, num_classes, H, W, C): for tests and small sets only
  (the stage reads them per batch with `initial_batch`)."""
  rows = initial_rows(dataset, ipc, seed, kind)
  every = np.arange(dataset.num_classes)
  return np.stack([initial_batch(dataset, rows, i, every, seed, mean, std, dtype)
                   for i in range(ipc)])


def class_chunks(num_classes: int, classes_per_batch: int) -> list[np.ndarray]:
  """Classes of one ipc index split into batches (ImageNet: 10 batches of 100 classes)."""
  size = classes_per_batch or num_classes
  return [np.arange(s, min(s + size, num_classes)) for s in range(0, num_classes, size)]


def batch_key(seed: int, ipc_index: int, chunk: int):
  """Each (ipc index, class chunk) has its own key, whatever device or process runs it."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), ipc_index), chunk)


def owned_batches(ipc: int, num_chunks: int, process_index: int, process_count: int,
                  chained: bool = False):
  """The (ipc index, chunk) pairs this process synthesises, in order: every process_count-th
  batch, so the counts differ by one batch at most (ImageNet ipc 10 on 4 hosts: 25 each). With
  compat_q2 (`chained`) an ipc index's chunks run one after another on one device, so whole
  ipc indices are dealt out instead."""
  every = [(i, j) for i in range(ipc) for j in range(num_chunks)]
  if chained:
    return [(i, j) for i, j in every if i % process_count == process_index]
  return every[process_index::process_count]


def log_iterations(log: metrics_log.MetricsLog, method: str, group, num_chunks: int, cfg, first: int,
                   metrics, every: int) -> None:
  """TensorBoard curves of every `every`-th iteration of each batch of the group (its CE and
  weighted BN loss), at step (batch index · iterations + iteration), so one curve per quantity
  runs through the batches in order."""
  if not every:
    return
  for (i, j), m in zip(group, metrics):
    t = np.arange(first, first + len(m["ce"]))
    keep = t % every == 0
    steps = (i * num_chunks + j) * cfg.iterations + t[keep]
    log.series(f"recover/{method}/iteration", "ce", steps, np.asarray(m["ce"])[keep])
    log.series(f"recover/{method}/iteration", "bn_loss", steps,
               weighted_bn_loss(m["bn_terms"], cfg.first_bn_weight)[keep])


def weighted_bn_loss(bn_terms, first_bn_weight: float):
  """The weighted BN loss Σ_l w_l·term_l over the last axis of `bn_terms`, in float64."""
  bn = np.asarray(bn_terms, np.float64)
  return bn @ np.asarray(bn_layer_weights(bn.shape[-1], first_bn_weight), np.float64)


def batch_draws(seed: int, ipc_index: int, chunk: int, cfg: SynthesisConfig, image_hw):
  """The augmentation draws of batch (ipc index, chunk): a function of the seed alone."""
  return draw_augmentation(batch_key(seed, ipc_index, chunk), cfg.iterations, cfg, image_hw)


def synthesize_owned(config, workdir, method: str, train, model, variables, meta,
                     devices=None, process_index: int = 0, process_count: int = 1) -> Progress:
  """Synthesises this process's batches into <workdir>/progress/<method>/, resuming any
  earlier progress of the same settings. Runs in the teacher's float dtype."""
  rc = config.recover
  devices = list(devices or jax.local_devices())
  cfg = synthesis_config(rc, method, devices[0].platform)
  mean, std = compat.pixel_normalisation(config, meta)
  image_shape = tuple(meta["image_shape"])
  dtype = jax.tree.leaves(variables["params"])[0].dtype
  chunks = class_chunks(train.num_classes, rc.classes_per_batch)
  if len({len(c) for c in chunks}) > 1:
    raise ValueError(f"recover.classes_per_batch={rc.classes_per_batch} must divide the "
                     f"{train.num_classes} classes.")
  cfg = engine_config(cfg, len(chunks))
  fingerprint = {"synthesis": dataclasses.asdict(cfg), "seed": config.seed, "ipc": config.ipc,
                 "dataset": config.dataset, "init": init_description(rc, method),
                 "classes_per_batch": rc.classes_per_batch, "teacher": meta,
                 "normalisation": [list(mean), list(std)], "dtype": str(dtype),
                 "teacher_sha256": files.tree_digest(variables)}
  progress = Progress(files.as_path(workdir) / "progress" / method, fingerprint)
  owned = owned_batches(config.ipc, len(chunks), process_index, process_count, cfg.chained)
  todo = [b for b in owned if not progress.is_done(*b)]
  for b in owned:
    if b not in todo:
      progress.check_done(*b)
  log = metrics_log.MetricsLog(files.as_path(workdir) / "metrics.jsonl")
  if len(todo) < len(owned):
    status.say(f"recover: {method}: resuming, {len(owned) - len(todo)} of {len(owned)} batches "
               "done")
    log.write(f"recover/{method}/resume", 0, finished_batches=len(owned) - len(todo))
  if not todo:
    return progress
  per_device = rc.batches_per_device
  # Every local device, even when fewer batches remain (a short group is padded): the program
  # depends on the device count (1 vs more, in the last bits), so a resumed run keeps it.
  runner = GroupRunner(model, variables, image_shape, mean, std, cfg, devices, per_device)
  kind = init_kind(rc, method)
  scored = real_init.ScoredInit.from_config(rc) if kind == "scored" else None
  rows = initial_rows(train, config.ipc, config.seed, kind, scored.candidates if scored else 1)
  # A committee's first teacher (this workdir's) scores the real crops.
  scorer = (real_init.make_scorer(model, first_teacher(variables, cfg), mean, std, scored)
            if scored else None)
  # Iterations run in chunks of checkpoint_every whatever the clock: the chunks decide the
  # compiled programs, so a resumed run computes the same bytes.
  every = rc.checkpoint_every or cfg.iterations
  chained = cfg.chained
  with tqdm.tqdm(total=len(todo) * cfg.iterations, desc=f"recover: {method}",
                  unit="batch-it", mininterval=1.0) as bar:
    for batches in batch_groups(todo, runner.size, chained):
      # The random-Δθ ablation's key (the draws use the batch key's other half).
      aug_keys = [jax.random.split(batch_key(config.seed, i, j))[1] for i, j in batches]
      draws = [batch_draws(config.seed, i, j, cfg, image_shape[:2]) for i, j in batches]
      labels = np.stack([chunks[j] for _, j in batches])
      x_init = np.stack([initial_batch(train, rows, i, chunks[j], config.seed, mean, std, dtype,
                                       scorer) for i, j in batches])
      chains = ([progress.load_carry(i, j - 1, variables["params"]) if j > 0 else None
                 for i, j in batches] if chained else None)
      # The batches, and the group size (the in-flight state's shape) they ran in.
      group_id = ",".join(f"{i}:{j}" for i, j in batches) + f"/{runner.size}"
      started = time.time()
      group, start_metrics = runner.start(x_init, labels, aug_keys, draws, chains)
      restored = progress.load_inflight(group_id, group.state)
      if restored is not None:
        group.state = restored
        status.say(f"recover: {method}: batches {group_id} resume at iteration {group.t}")
        log.write(f"recover/{method}/resume", group.t, group=group_id,
                  inflight_iteration=group.t)
      bar.update(len(batches) * group.t)
      metrics, saved_at = None, time.time()
      while group.t < cfg.iterations:
        n = min(every, cfg.iterations - group.t)
        metrics = runner.advance(group, n)
        if not all(np.all(np.isfinite(m["ce"])) and np.all(np.isfinite(m["bn_terms"]))
                   for m in metrics):
          raise FloatingPointError(
              f"recover: the synthesis loss became non-finite (NaN/inf) in batches {batches}; "
              "lower recover.lr or check the teacher checkpoint.")
        log_iterations(log, method, batches, len(chunks), cfg, group.t - n, metrics,
                       rc.scalars_every)
        if group.t < cfg.iterations and time.time() - saved_at >= rc.checkpoint_every_s:
          save_started = time.time()
          saved_bytes = progress.save_inflight(group_id, group.state)
          saved_at = time.time()
          log.write(f"recover/{method}/checkpoint", group.t, group=group_id,
                    seconds=saved_at - save_started, megabytes=saved_bytes / 2**20)
        bar.update(len(batches) * n)
        bar.set_postfix(ce=f"{metrics[0]['ce'][-1]:.3f}")
      if metrics is None:
        raise RuntimeError("in-flight checkpoint at the final iteration; delete progress and rerun")
      for k, (i, j) in enumerate(batches):
        start, m = start_metrics[k], metrics[k]
        deltas = ("delta_norm", "delta_norm_chunk", "delta_norm_ratio", "delta_cosine")
        summary = {"ipc_index": i, "chunk": j,
                   **{name: float(start[name]) for name in deltas if name in start},
                   "final_ce": float(m["ce"][-1]),
                   "final_bn_loss": float(weighted_bn_loss(m["bn_terms"][-1], cfg.first_bn_weight))}
        if chained:
          progress.save_carry(i, j, group.chain(k))
        progress.save_done(i, j, group.x(k), summary)
        if chained and j > 0:
          progress.drop_carry(i, j - 1)
        seconds = (time.time() - started) / len(batches)
        log.write(f"recover/{method}", i * len(chunks) + j, seconds=seconds,
                  image_iterations_per_second=len(chunks[j]) * cfg.iterations / seconds,
                  **summary)
      progress.clear_inflight()
  if jax.process_index() == 0:
    log.write(f"recover/{method}/compilations", 0, devices=len(devices),
              batches_per_device=per_device, **runner.compilations())
  return progress


def run(config, workdir, method: str, devices=None) -> dict | None:
  """Synthesises `config.ipc` images per class with `method` and saves them under
  `<workdir>/synthetic/<method>/`: images.npz (float32 in [0, 1], lossless), png/classNNN/*.png,
  grid.png (rows = ipc index, columns = classes), recover.json (settings, per-batch metrics) and
  manifest.json (sha256 of every file, written last). Returns the summary on process 0."""
  train = data.load_dataset(config.dataset, "train", config.data_dir)
  model, variables, meta = load_committee(workdir, config.recover, train)
  chunks = class_chunks(train.num_classes, config.recover.classes_per_batch)
  if config.ipc > np.min(np.bincount(train.labels, minlength=train.num_classes)):
    data.sample_per_class(train, config.ipc, config.seed)  # raises the clear DataError
  p, n = jax.process_index(), jax.process_count()
  progress = synthesize_owned(config, workdir, method, train, model, variables, meta, devices,
                              p, n)
  if p != 0:
    return None
  # Every process runs on `devices` (default: all its local devices).
  devices = devices or jax.local_devices()
  cfg = engine_config(synthesis_config(config.recover, method, devices[0].platform), len(chunks))
  owners = {b: q for q in range(n) for b in owned_batches(config.ipc, len(chunks), q, n,
                                                          cfg.chained)}
  wait_for_batches(progress, owners, config.recover.wait_timeout_s)
  out_dir = files.as_path(workdir) / "synthetic" / method
  stage = {"devices": len(devices) * n, "processes": n}
  # Written beside the set and swapped in when complete: a failure leaves the old set whole.
  with files.staged_dir(out_dir) as staging:
    summary = write_outputs(staging, progress, config, method, meta, train.num_classes, chunks,
                            dataclasses.asdict(cfg), compat_record(config, cfg, train.num_classes),
                            init_description(config.recover, method), stage)
  files.remove_tree(progress.root)  # everything is in the outputs now
  status.say(f"recover: {method} wrote {summary['num_images']} images to {out_dir}")
  return summary
