"""Relabel + validate: train fresh students on a synthetic set and report top-1 on real data.

The evaluation protocol (config `relabel.*`, docs/evaluation.md) is written as a card into
results.json and results.md. Top-1 on the real test split is reported at the final epoch and as
the best over the periodic evaluations, each as mean ± std over seeds; a random real subset of
the same size, trained with the same protocol, is the baseline.
"""

import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import auto as tqdm

from dwa_jax import (augment, compat, data, data_parallel, errors, files, input_pipeline,
                     metrics_log, status, store, teacher_store, train_lib, train_loop)
from dwa_jax.models import build_model

RANDOM_REAL = "random_real"


def kd_loss(student_logits, teacher_logits, temperature: float, t2_factor: bool):
  """KLDiv(batchmean) of log_softmax(s/T) against softmax(t/T), optionally times T²."""
  log_p_s = jax.nn.log_softmax(student_logits / temperature)
  log_p_t = jax.nn.log_softmax(teacher_logits / temperature)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s)) / student_logits.shape[0]
  return kl * temperature**2 if t2_factor else kl


def soft_cross_entropy(logits, target_probs):
  """Cross-entropy against a distribution (one-hot labels, or mixed ones), batch mean."""
  return -jnp.sum(target_probs * jax.nn.log_softmax(logits)) / logits.shape[0]


def mse_ce_loss(student_logits, teacher_logits, label_probs, ce_weight: float):
  """EDC's loss: mean squared error between the logits + γ · cross-entropy on the set's labels."""
  return (jnp.mean(jnp.square(student_logits - teacher_logits))
          + ce_weight * soft_cross_entropy(student_logits, label_probs))


def mix(key, x, kind: str, alpha: float):
  """Mixup or CutMix of the images: (mixed, perm, λ), with λ the share of x (1 without mixing).
  The teacher labels the mixed images directly; hard labels are mixed with the same λ."""
  if kind == "mixup":
    return augment.mixup(key, x, alpha)
  if kind == "cutmix":
    return augment.cutmix(key, x, alpha)
  if kind == "none":
    return x, jnp.arange(x.shape[0]), jnp.ones((), x.dtype)
  raise ValueError(f"Unknown mixing {kind!r}; use 'mixup', 'cutmix' or 'none'.")


def student_input(rc, teachers, mean, std, num_classes: int) -> train_loop.Prepare:
  """A student batch: augmented (and mixed) images, and the target: the set's labels mixed as
  the images were ("hard", a distribution) and, unless relabel.labels='hard', the frozen
  teachers' logits on exactly those images, averaged over the ensemble ("teacher"). `aux` = the
  teachers' variables, one per model in `teachers`."""

  def prepare(key, images, labels, teacher_vars):
    aug_key, mix_key = jax.random.split(key)
    x = train_lib.augment_views(aug_key, train_lib.normalize(images, mean, std), rc.augment)
    x, perm, lam = mix(mix_key, x, rc.mixing, rc.mix_alpha)
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=x.dtype)
    target = {"hard": lam * one_hot + (1 - lam) * one_hot[perm]}
    if rc.labels == "hard":
      return x, target
    logits = []
    for teacher, variables in zip(teachers, teacher_vars):
      if rc.teacher_train_mode:  # official CIFAR quirk: teacher BN on batch statistics
        logits.append(teacher.apply(variables, x, train=True, mutable=["batch_stats"])[0])
      else:
        logits.append(teacher.apply(variables, x, train=False))
    target["teacher"] = jax.lax.stop_gradient(sum(logits) / len(logits))
    return x, target

  return prepare


def student_loss(rc) -> train_loop.Loss:
  """The loss of relabel.labels / relabel.loss, on prepare's target."""
  if rc.labels == "hard":
    return lambda logits, target: soft_cross_entropy(logits, target["hard"])
  if rc.loss == "mse_ce":
    return lambda logits, target: mse_ce_loss(logits, target["teacher"], target["hard"],
                                              rc.ce_weight)
  return lambda logits, target: kd_loss(logits, target["teacher"], rc.temperature, rc.t2_factor)


def evaluation_epochs(rc) -> set[int]:
  """The epochs after which students are evaluated (relabel.eval_every, compat_eval_epochs)."""
  return train_loop.eval_epochs(rc.epochs, rc.eval_every, bool(rc.compat_eval_epochs))


def open_synthetic_set(spec: str, image_shape, num_classes: int) -> data.Dataset:
  """A synthetic set made elsewhere: `folder:PATH` (an ImageFolder of PNG/JPEG, e.g. the authors'
  released `new{c:03d}/class{c:03d}_id{i:03d}.jpg`) or `npz:PATH` (`images` uint8 or float in
  [0, 1], `labels`). Checked against the teacher's image shape and classes."""
  kind, _, path = spec.partition(":")
  if kind == "folder" and path:
    mode = "L" if image_shape[-1] == 1 else "RGB"  # files are read at their own size
    paths, labels, names = data.image_folder_files(path)
    dataset = data.Dataset(data.FileImages(paths, None, mode), np.asarray(labels, np.int32),
                           len(names), tuple(names), (), (), spec)
  elif kind == "npz" and path:
    dataset = data.load_npz(path, allow_float=True)
  else:
    raise ValueError(f"relabel.synthetic_set must be 'folder:PATH' or 'npz:PATH', got {spec!r}.")
  if tuple(dataset.images.shape[1:]) != tuple(image_shape):
    raise data.DataError(f"{spec}: images of shape {tuple(dataset.images.shape[1:])}, but the "
                         f"teacher takes {tuple(image_shape)}.")
  if dataset.num_classes != num_classes:
    raise data.DataError(f"{spec}: {dataset.num_classes} classes, but the teacher has "
                         f"{num_classes}.")
  return dataset


def synthetic_set(workdir, method: str):
  """The set `recover` wrote for `method` (images read row by row from its images.npz, and
  labels)."""
  path = files.as_path(workdir) / "synthetic" / method / "images.npz"
  if not path.exists():
    raise FileNotFoundError(f"No synthetic set at {path}: run the recover stage for {method!r} "
                            "first (--config.stage=recover).")
  expected = set_identity(workdir, method)
  digest = files.sha256(path)
  if expected != method and digest != expected:
    raise data.DataError(f"{path} does not match its manifest (sha256 differs): it changed after "
                         f"recover wrote it; rerun the recover stage for {method!r}.")
  # Students read the set row by row: from an object store, a local copy first.
  dataset = data.load_npz(files.local_copy(path, digest), allow_float=True)
  return dataset.images, dataset.labels


def random_real_indices(train: data.Dataset, ipc: int, seed: int) -> np.ndarray:
  """The random real baseline: ipc training images per class, drawn with seed + 1 (not the DWA
  initialisation draw)."""
  return data.sample_per_class(train, ipc, seed + 1).reshape(-1)


def random_real_set(train: data.Dataset, ipc: int, seed: int):
  """The random real baseline's images (uint8, read through the training set) and labels."""
  indices = random_real_indices(train, ipc, seed)
  return data.SubsetImages(train.images, indices), train.labels[indices]


def stage_devices(workdir, teacher_meta: dict, methods, relabel_stage: dict) -> dict:
  """How many devices and processes ran each stage behind these results: squeeze (from
  teacher.json), recover (recover.json of each method; the largest) and relabel."""
  stages = {}
  if "stage" in teacher_meta:
    stages["squeeze"] = teacher_meta["stage"]
  recovered = [files.read_json(p, "synthetic set summary").get("stage") for p in (
      files.as_path(workdir) / "synthetic" / m / "recover.json" for m in methods) if p.exists()]
  recovered = [s for s in recovered if s]
  if recovered:
    stages["recover"] = max(recovered, key=lambda s: (s["devices"], s["processes"]))
  stages["relabel"] = relabel_stage
  return stages


def set_identity(workdir, name: str) -> str:
  """What identifies a set's images for resuming: a recovered set's images.npz digest (from its
  manifest), else the name (random real subsets are a function of the data and seed)."""
  manifest = files.as_path(workdir) / "synthetic" / name / "manifest.json"
  if manifest.exists():
    listed = files.read_json(manifest, "synthetic set manifest", keys=("files",))["files"]
    if not isinstance(listed, dict):
      raise errors.InputError(f"synthetic set manifest {manifest}: 'files' is not an object; "
                             "rerun the recover stage")
    return listed.get("images.npz", name)
  return name


def seed_fingerprint(config, name: str, identity: str, num_images: int, seed: int,
                     teacher_digest: str) -> dict:
  """What determines one student run; finished runs and checkpoints with another are redone."""
  recipe = {k: v for k, v in config.relabel.to_dict().items()
            if k not in ("seeds", "random_real_baseline", "synthetic_set", "save_every_epochs",
                         "caption")}
  return files.as_json(
      {"set": name, "images": identity, "num_images": num_images, "seed": seed,
       "relabel": recipe, "teacher": teacher_digest, "dataset": config.dataset,
       "sync_batch_norm": config.sync_batch_norm, "processes": jax.process_count()})


def student_run(trainer: train_loop.Trainer, config, workdir, name, images, labels, identity,
                seed, teacher_vars, teacher_digest, test: data.Dataset,
                log: metrics_log.MetricsLog) -> dict:
  """Trains one student on `images` (N, H, W, C: uint8, or float in [0, 1]; an array or an
  ImageSource) and `labels`; returns final/best top-1 (%) and the history. `teacher_vars`: a
  tuple, as `trainer`'s teachers. Resumable in the store `relabel/<set>/seed_<s>/`: its
  `result.json`, written as the student finishes, is reused by a rerun with the same settings;
  a checkpoint is saved every `relabel.save_every_epochs` epochs."""
  fingerprint = seed_fingerprint(config, name, identity, len(images), seed, teacher_digest)
  slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
  student = store.Store(files.as_path(workdir) / "relabel" / slug / f"seed_{seed}", fingerprint,
                        "student")
  done = student.directory / "result.json"
  if done.exists():
    result = files.read_json(done, "finished student result", "; delete it to train that "
                             "student again", keys=("final", "best", "history"))
    if jax.process_index() == 0:
      log.write(f"relabel/{name} seed {seed}/resume", 0, finished_seed=True)
    student.finish()
    return result
  every, desc = config.relabel.save_every_epochs, f"relabel: {name} seed {seed}"
  state, history = trainer.train(
      images, np.asarray(labels, np.int32), test, seed=seed, aux=teacher_vars,
      evaluate_after=evaluation_epochs(trainer.recipe), log=log, log_name=f"relabel/{desc}",
      desc=desc, checkpoints=train_loop.TrainCheckpoints(student, every) if every else None,
      leave_bar=False)
  # The final student's digest (its EMA too, if any): resumed or spread over processes, the
  # student must come out the same bits, which its accuracies alone would not show.
  result = {"final": history[-1][1], "best": max(a for _, a in history),
            "history": [list(h) for h in history],
            "student_sha256": files.tree_digest((state.variables, getattr(state, "ema", None)))}
  if jax.process_index() == 0:
    files.write_json(done, result)
  student.finish()  # (a barrier: every process sees result.json from here on)
  return result


def results_table(results: dict) -> str:
  """Markdown table: one row per image set, final and best top-1 as mean ± std over seeds."""
  lines = ["| images | ipc | seeds | final top-1 (%) | best top-1 (%) |",
           "|---|---|---|---|---|"]
  for name, r in results["sets"].items():
    lines.append(f"| {name} | {results['ipc']} | {len(r['seeds'])} | "
                 f"{r['final_mean']:.2f} ± {r['final_std']:.2f} | "
                 f"{r['best_mean']:.2f} ± {r['best_std']:.2f} |")
  return "\n".join(lines)


def loss_description(rc) -> str:
  """The students' loss in words, for the protocol card."""
  if rc.labels == "hard":
    return "cross-entropy"
  if rc.loss == "mse_ce":
    return f"MSE(logits) + {rc.ce_weight:g} x CE"
  return f"KL at T={rc.temperature:g}" + (" x T²" if rc.t2_factor else "")


def protocol_card(config, teacher_dirs, metas, evaluated_after) -> dict:
  """Everything that decides an evaluation's number besides the images: written beside the
  results, so numbers from different protocols are never compared unknowingly."""
  rc = config.relabel
  soft = rc.labels == "teacher"
  return {
      "labels": "online teacher soft labels" if soft else "hard labels (no teacher)",
      "teacher_mode": ("train (batch statistics)" if rc.teacher_train_mode else "eval")
                      if soft else None,
      "teachers": [{"workdir": os.fspath(d), "model": m["model"],
                    "test_accuracy": m["test_accuracy"], "source": m.get("source")}
                   for d, m in zip(teacher_dirs, metas)] if soft else [],
      "loss": loss_description(rc),
      "student": rc.student, "epochs": rc.epochs, "batch_size": rc.batch_size,
      "optimizer": rc.optimizer, "lr": rc.lr, "lr_floor": rc.lr_floor,
      "weight_decay": rc.weight_decay, "warmup_epochs": rc.warmup_epochs,
      "augment": rc.augment, "mixing": rc.mixing,
      "mix_alpha": rc.mix_alpha if rc.mixing != "none" else None,
      "ema_decay": rc.ema_decay or None,
      "evaluated_after_epochs": sorted(evaluated_after), "headline": rc.headline,
      "seeds": list(rc.seeds), "synthesis_seed": config.seed,
      "random_real_seed": config.seed + 1 if rc.random_real_baseline else None}


def protocol_markdown(card: dict) -> str:
  """The protocol card as a two-column markdown table."""
  lines = ["| protocol | |", "|---|---|"]
  for key, value in card.items():
    if key == "teachers":
      value = "; ".join(f"{t['model']} {t['test_accuracy']:.2f}% ({t['workdir']})"
                        for t in value) or None
    elif key == "evaluated_after_epochs":
      value = ", ".join(map(str, value))
    if value is not None:
      lines.append(f"| {key} | {value} |")
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir, devices=None) -> dict:
  """Validates every synthetic set of `config.methods`, or the set `relabel.synthetic_set` names
  instead, (+ the random real baseline) over seeds, data-parallel over every device of every
  process (or `devices`); writes `<workdir>/results.json` and `results.md` and prints the
  table. A rerun after a kill redoes only the unfinished students."""
  rc = config.relabel
  train = data.load_dataset(config.dataset, "train", config.data_dir)
  test = data.load_dataset(config.dataset, "test", config.data_dir)
  # This workdir's teacher and relabel.teacher_ensemble's (none for hard labels), in that order.
  teachers, teacher_vars, metas = ((), (), ()) if rc.labels == "hard" else (
      teacher_store.load_teachers(workdir, rc.teacher_ensemble, train, "relabel.teacher_ensemble",
                                  "an ensemble needs one normalisation"))
  meta = metas[0] if metas else teacher_store.read_teacher_meta(
      teacher_store.teacher_path(workdir) / "teacher.json")
  mean, std = compat.pixel_normalisation(config, meta)
  log = metrics_log.MetricsLog(files.as_path(workdir) / "metrics.jsonl")
  pipeline = input_pipeline.PipelineConfig.from_config(config)
  layout = data_parallel.Layout.from_config(config, devices)
  lead = jax.process_index() == 0
  if rc.synthetic_set:
    external = open_synthetic_set(rc.synthetic_set, meta["image_shape"], meta["num_classes"])
    sets = {rc.synthetic_set: (external.images, external.labels)}
  else:
    sets = {m: synthetic_set(workdir, m) for m in config.methods}
  if rc.random_real_baseline:
    sets[RANDOM_REAL] = random_real_set(train, config.ipc, config.seed)
  # The run's own teacher is named "." (this workdir): results do not depend on where it lies.
  card = protocol_card(config, (".", *rc.teacher_ensemble), metas, evaluation_epochs(rc))
  results = {"dataset": config.dataset, "ipc": config.ipc, "student": rc.student,
             "teacher_test_accuracy": meta["test_accuracy"], "protocol": card,
             "compat": compat.settings(config),
             "normalisation": {"mean": list(mean), "std": list(std)},
             "stages": stage_devices(workdir, meta, [] if rc.synthetic_set else config.methods,
                                     {"devices": layout.num_devices,
                                      "processes": jax.process_count()}),
             "sets": {}}
  # One trainer for every set and seed: it compiles once per input shape and dtype.
  trainer = train_loop.Trainer(
      build_model(rc.student, test.num_classes), rc, loss=student_loss(rc),
      prepare=student_input(rc, teachers, mean, std, test.num_classes), mean=mean, std=std,
      layout=layout, pipeline=pipeline)
  teacher_digest = files.tree_digest(teacher_vars)
  for name, (images, labels) in sets.items():
    identity = set_identity(workdir, name)
    runs = [student_run(trainer, config, workdir, name, images, labels, identity, seed,
                        teacher_vars, teacher_digest, test, log)
            for seed in tqdm.tqdm(rc.seeds, desc=f"relabel: {name}", unit="seed",
                                  disable=not lead)]
    summary = results["sets"][name] = {"seeds": list(rc.seeds), "runs": runs,
                                       "num_images": len(images)}
    for kind in ("final", "best"):
      values = np.asarray([r[kind] for r in runs], np.float64)
      summary[f"{kind}_mean"] = float(values.mean())
      summary[f"{kind}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    summary["headline_mean"] = summary[f"{rc.headline}_mean"]
  table = results_table(results) + (f"\n\n{rc.caption}" if rc.caption else "")
  if lead:
    log.write("relabel/compilations", 0, **trainer.compilations())
    files.write_json(files.as_path(workdir) / "results.json", results)
    files.write_bytes(files.as_path(workdir) / "results.md",
                      (f"Teacher {meta['model']}: {meta['test_accuracy']:.2f}% test top-1\n\n"
                       + table + "\n\n" + protocol_markdown(card) + "\n").encode())
    status.say(f"\nStudents ({rc.student}, {rc.epochs} epochs) on {config.dataset}, "
               f"teacher {meta['test_accuracy']:.2f}%:\n{table}")
  return results
