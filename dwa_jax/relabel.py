"""Relabel + validate: train fresh students on a synthetic set with online teacher soft labels.

Every augmented (and mixed) batch is labelled by the frozen teacher on the fly; the student
minimises KL(softmax(t/T) || softmax(s/T)) (batch mean, optional T² factor). Top-1 on the real
test split is reported at the final epoch AND as the best over the periodic evaluations (what the
official scripts print), each as mean ± std over seeds. A random real subset of the same size,
trained with the same recipe, is the baseline.
"""

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import auto as tqdm

from dwa_jax import (augment, compat, data, data_parallel, files, input_pipeline, squeeze,
                     train_checkpoints, train_lib, train_loop)
from dwa_jax.models import build_model

RANDOM_REAL = "random_real"


def kd_loss(student_logits, teacher_logits, temperature: float, t2_factor: bool):
  """KLDiv(batchmean) of log_softmax(s/T) against softmax(t/T), optionally times T²."""
  log_p_s = jax.nn.log_softmax(student_logits / temperature)
  log_p_t = jax.nn.log_softmax(teacher_logits / temperature)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s)) / student_logits.shape[0]
  return kl * temperature**2 if t2_factor else kl


def mix(key, x, kind: str, alpha: float):
  """Mixup or CutMix of the images only: the teacher labels the mixed images directly."""
  if kind == "mixup":
    return augment.mixup(key, x, alpha)[0]
  if kind == "cutmix":
    return augment.cutmix(key, x, alpha)[0]
  if kind == "none":
    return x
  raise ValueError(f"Unknown mixing {kind!r}; use 'mixup', 'cutmix' or 'none'.")


def student_input(rc, teacher, mean, std) -> train_loop.Prepare:
  """A student batch: augmented (and mixed) images, and the frozen teacher's logits on exactly
  those images as the target (`aux` = the teacher's variables)."""

  def prepare(key, images, labels, teacher_vars):
    del labels  # the teacher labels every batch
    aug_key, mix_key = jax.random.split(key)
    x = train_lib.augment_views(aug_key, train_lib.normalize(images, mean, std), rc.augment)
    x = mix(mix_key, x, rc.mixing, rc.mix_alpha)
    if rc.teacher_train_mode:  # official CIFAR quirk: teacher BN on batch statistics
      t_logits, _ = teacher.apply(teacher_vars, x, train=True, mutable=["batch_stats"])
    else:
      t_logits = teacher.apply(teacher_vars, x, train=False)
    return x, jax.lax.stop_gradient(t_logits)

  return prepare


def student_trainer(rc: ml_collections.ConfigDict, teacher, num_classes: int, mean, std,
                    layout: data_parallel.Layout,
                    pipeline: input_pipeline.PipelineConfig) -> train_loop.Trainer:
  """The students' trainer: built once per run, it compiles once for every set and seed."""
  return train_loop.Trainer(
      build_model(rc.student, num_classes), rc, prepare=student_input(rc, teacher, mean, std),
      loss=functools.partial(kd_loss, temperature=rc.temperature, t2_factor=rc.t2_factor),
      mean=mean, std=std, layout=layout, pipeline=pipeline)


def train_student(trainer: train_loop.Trainer, teacher_vars, images, test: data.Dataset,
                  seed: int, desc: str, log: files.MetricsLog, checkpoints=None) -> dict:
  """Trains one student on `images` (N, H, W, C: uint8, or float in [0, 1]; an array or an
  ImageSource, read through the input pipeline); returns final/best top-1 (%)."""
  rc = trainer.recipe
  # The teacher labels every batch, so the set's own labels are never read.
  _, history = trainer.train(
      images, np.zeros((len(images),), np.int32), test, seed=seed, aux=teacher_vars,
      evaluate_after=train_loop.eval_epochs(rc.epochs, rc.eval_every, bool(rc.compat_eval_epochs)),
      log=log, log_name=f"relabel/{desc}", desc=desc, checkpoints=checkpoints, leave_bar=False)
  return {"final": history[-1][1], "best": max(a for _, a in history),
          "history": [list(h) for h in history]}


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
  """The set `recover` wrote for `method`, read row by row from its images.npz."""
  path = pathlib.Path(workdir) / "synthetic" / method / "images.npz"
  if not path.exists():
    raise FileNotFoundError(f"No synthetic set at {path}: run the recover stage for {method!r} "
                            "first (--config.stage=recover).")
  expected = set_identity(workdir, method)
  if expected != method and files.sha256(path) != expected:
    raise data.DataError(f"{path} does not match its manifest (sha256 differs): it changed after "
                         f"recover wrote it; rerun the recover stage for {method!r}.")
  return data.load_npz(path, allow_float=True).images


def random_real_indices(train: data.Dataset, ipc: int, seed: int) -> np.ndarray:
  """The random real baseline: ipc training images per class, drawn with seed + 1 (not the DWA
  initialisation draw)."""
  return data.sample_per_class(train, ipc, seed + 1).reshape(-1)


def random_real_set(train: data.Dataset, ipc: int, seed: int):
  """The random real baseline's images (uint8), read through the training set."""
  return data.SubsetImages(train.images, random_real_indices(train, ipc, seed))


def stage_devices(workdir, teacher_meta: dict, methods, relabel_stage: dict) -> dict:
  """How many devices and processes ran each stage behind these results: squeeze (from
  teacher.json), recover (recover.json of each method; the largest) and relabel."""
  stages = {}
  if "stage" in teacher_meta:
    stages["squeeze"] = teacher_meta["stage"]
  recovered = [files.read_json(p, "synthetic set summary").get("stage") for p in (
      pathlib.Path(workdir) / "synthetic" / m / "recover.json" for m in methods) if p.exists()]
  recovered = [s for s in recovered if s]
  if recovered:
    stages["recover"] = max(recovered, key=lambda s: (s["devices"], s["processes"]))
  stages["relabel"] = relabel_stage
  return stages


def set_identity(workdir, name: str) -> str:
  """What identifies a set's images for resuming: a recovered set's images.npz digest (from its
  manifest), else the name (random real subsets are a function of the data and seed)."""
  manifest = pathlib.Path(workdir) / "synthetic" / name / "manifest.json"
  if manifest.exists():
    listed = files.read_json(manifest, "synthetic set manifest", keys=("files",))["files"]
    if not isinstance(listed, dict):
      raise files.InputError(f"synthetic set manifest {manifest}: 'files' is not an object; "
                             "rerun the recover stage")
    return listed.get("images.npz", name)
  return name


def seed_fingerprint(config, name: str, identity: str, num_images: int, seed: int,
                     teacher_digest: str) -> dict:
  """What determines one student run; finished runs and checkpoints with another are redone."""
  recipe = {k: v for k, v in config.relabel.to_dict().items()
            if k not in ("seeds", "random_real_baseline", "synthetic_set", "save_every_epochs")}
  return {"set": name, "images": identity, "num_images": num_images, "seed": seed,
          "relabel": recipe, "teacher": teacher_digest, "dataset": config.dataset,
          "sync_batch_norm": config.get("sync_batch_norm"), "processes": jax.process_count()}


def run_dir(workdir, name: str, seed: int) -> pathlib.Path:
  slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
  return pathlib.Path(workdir) / "relabel" / slug / f"seed_{seed}"


def student_run(trainer, config, workdir, name, images, identity, seed, teacher_vars,
                teacher_digest, test, log) -> dict:
  """One student, resumable: its result is written to `relabel/<set>/seed_<s>/result.json` as
  soon as it finishes (and reused by a rerun with the same settings); while it trains, a
  checkpoint is saved every `relabel.save_every_epochs` epochs."""
  directory = run_dir(workdir, name, seed)
  fingerprint = seed_fingerprint(config, name, identity, len(images), seed, teacher_digest)
  done = directory / "result.json"
  if done.exists():
    saved = files.read_json(done, "finished student result", "; delete it to train that "
                            "student again", keys=("fingerprint", "result"))
    if saved["fingerprint"] == fingerprint:
      if not (isinstance(saved["result"], dict) and {"final", "best", "history"} <= set(saved["result"])):
        raise files.InputError(f"finished student result {done} lacks final, best or history; "
                               "delete it to train that student again")
      if jax.process_index() == 0:
        log.write(f"relabel/{name} seed {seed}/resume", 0, finished_seed=True)
      return saved["result"]
  every = config.relabel.save_every_epochs
  checkpoints = (train_checkpoints.TrainCheckpoints(directory / "checkpoints", fingerprint, every)
                 if every else None)
  result = train_student(trainer, teacher_vars, images, test, seed,
                         f"relabel: {name} seed {seed}", log, checkpoints)
  if jax.process_index() == 0:
    files.write_json(done, {"fingerprint": fingerprint, "result": result})
  if checkpoints is not None:
    checkpoints.remove()  # (a barrier: every process sees result.json from here on)
  return result


def mean_std(values) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def results_table(results: dict) -> str:
  """Markdown table: one row per image set, final and best top-1 as mean ± std over seeds."""
  lines = ["| images | ipc | seeds | final top-1 (%) | best top-1 (%) |",
           "|---|---|---|---|---|"]
  for name, r in results["sets"].items():
    lines.append(f"| {name} | {results['ipc']} | {len(r['seeds'])} | "
                 f"{r['final_mean']:.2f} ± {r['final_std']:.2f} | "
                 f"{r['best_mean']:.2f} ± {r['best_std']:.2f} |")
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir, devices=None) -> dict:
  """Validates every synthetic set of `config.methods`, or the set `relabel.synthetic_set` names
  instead, (+ the random real baseline) over seeds, data-parallel over every device of every
  process (or `devices`); writes `<workdir>/results.json` and `results.md` and prints the
  table. Each student's result is kept as it finishes, so a rerun after a kill redoes only the
  unfinished ones (from their last checkpoint)."""
  config = compat.resolve(config)
  rc = config.relabel
  train = data.load_dataset(config.dataset, "train", config.data_dir)
  test = data.load_dataset(config.dataset, "test", config.data_dir)
  teacher, teacher_vars, meta = squeeze.load_teacher(workdir, train)
  mean, std = compat.pixel_normalisation(config, meta)
  log = files.MetricsLog(pathlib.Path(workdir) / "metrics.jsonl")
  pipeline = input_pipeline.PipelineConfig.from_config(config)
  layout = data_parallel.Layout.from_config(config, devices)
  lead = jax.process_index() == 0
  if rc.synthetic_set:
    sets = {rc.synthetic_set: open_synthetic_set(rc.synthetic_set, meta["image_shape"],
                                                 meta["num_classes"]).images}
  else:
    sets = {m: synthetic_set(workdir, m) for m in config.methods}
  if rc.random_real_baseline:
    sets[RANDOM_REAL] = random_real_set(train, config.ipc, config.seed)
  relabel_stage = {"devices": layout.num_devices, "processes": jax.process_count()}
  results = {"dataset": config.dataset, "ipc": config.ipc, "student": rc.student,
             "teacher_test_accuracy": meta["test_accuracy"], "compat": compat.settings(config),
             "normalisation": {"mean": list(mean), "std": list(std)},
             "stages": stage_devices(workdir, meta, [] if rc.synthetic_set else config.methods,
                                     relabel_stage),
             "sets": {}}
  trainer = student_trainer(rc, teacher, test.num_classes, mean, std, layout, pipeline)
  teacher_digest = files.tree_digest(teacher_vars)
  for name, images in sets.items():
    identity = set_identity(workdir, name)
    runs = [student_run(trainer, config, workdir, name, images, identity, seed, teacher_vars,
                        teacher_digest, test, log)
            for seed in tqdm.tqdm(rc.seeds, desc=f"relabel: {name}", unit="seed",
                                  disable=not lead)]
    final_mean, final_std = mean_std([r["final"] for r in runs])
    best_mean, best_std = mean_std([r["best"] for r in runs])
    results["sets"][name] = {"seeds": list(rc.seeds), "runs": runs, "num_images": len(images),
                             "final_mean": final_mean, "final_std": final_std,
                             "best_mean": best_mean, "best_std": best_std}
  table = results_table(results)
  if lead:
    log.write("relabel/compilations", 0, **trainer.compilations())
    files.write_json(pathlib.Path(workdir) / "results.json", results)
    files.write_bytes(pathlib.Path(workdir) / "results.md",
                      (f"Teacher {meta['model']}: {meta['test_accuracy']:.2f}% test top-1\n\n"
                       + table + "\n").encode())
    print(f"\nStudents ({rc.student}, {rc.epochs} epochs) on {config.dataset}, "
          f"teacher {meta['test_accuracy']:.2f}%:\n{table}")
  return results
