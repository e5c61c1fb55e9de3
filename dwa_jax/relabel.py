"""Relabel + validate: train fresh students on a synthetic set with online teacher soft labels.

Every augmented (and mixed) batch is labelled by the frozen teacher on the fly; the student
minimises KL(softmax(t/T) || softmax(s/T)) (batch mean, optional T² factor). Top-1 on the real
test split is reported at the final epoch AND as the best over the periodic evaluations (what the
official scripts print), each as mean ± std over seeds. A random real subset of the same size,
trained with the same recipe, is the baseline.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import auto as tqdm

from dwa_jax import augment, compat, data, files, input_pipeline, squeeze, train_lib, train_loop
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


def train_student(rc: ml_collections.ConfigDict, teacher, teacher_vars, images,
                  test: data.Dataset, mean, std, seed: int, desc: str, log: files.MetricsLog,
                  pipeline: input_pipeline.PipelineConfig = input_pipeline.PipelineConfig()
                  ) -> dict:
  """Trains one student on `images` (N, H, W, C: uint8, or float in [0, 1]; an array or an
  ImageSource, read through the input pipeline); returns final/best top-1 (%)."""
  # The teacher labels every batch, so the set's own labels are never read.
  _, history = train_loop.train(
      build_model(rc.student, test.num_classes), rc, images, np.zeros((len(images),), np.int32),
      test, seed=seed, mean=mean, std=std, prepare=student_input(rc, teacher, mean, std),
      loss=functools.partial(kd_loss, temperature=rc.temperature, t2_factor=rc.t2_factor),
      aux=teacher_vars, evaluate_after=train_loop.eval_epochs(rc.epochs, rc.eval_every,
                                                              bool(rc.compat_eval_epochs)),
      log=log, log_name=f"relabel/{desc}", desc=desc, pipeline=pipeline, leave_bar=False)
  return {"final": history[-1][1], "best": max(a for _, a in history), "history": history}


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
  return data.load_npz(path, allow_float=True).images


def random_real_indices(train: data.Dataset, ipc: int, seed: int) -> np.ndarray:
  """The random real baseline: ipc training images per class, drawn with seed + 1 (not the DWA
  initialisation draw)."""
  return data.sample_per_class(train, ipc, seed + 1).reshape(-1)


def random_real_set(train: data.Dataset, ipc: int, seed: int):
  """The random real baseline's images (uint8), read through the training set."""
  return data.SubsetImages(train.images, random_real_indices(train, ipc, seed))


def stage_devices(workdir, teacher_meta: dict, methods) -> dict:
  """How many devices and processes ran each stage behind these results: squeeze (from
  teacher.json), recover (recover.json of each method; the largest) and relabel (one device of
  process 0)."""
  stages = {}
  if "stage" in teacher_meta:
    stages["squeeze"] = teacher_meta["stage"]
  recovered = [files.read_json(p).get("stage") for p in (
      pathlib.Path(workdir) / "synthetic" / m / "recover.json" for m in methods) if p.exists()]
  recovered = [s for s in recovered if s]
  if recovered:
    stages["recover"] = max(recovered, key=lambda s: (s["devices"], s["processes"]))
  stages["relabel"] = {"devices": 1, "processes": 1}
  return stages


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


def run(config: ml_collections.ConfigDict, workdir) -> dict:
  """Validates every synthetic set of `config.methods`, or the set `relabel.synthetic_set` names
  instead, (+ the random real baseline) over seeds; writes `<workdir>/results.json` and
  `results.md` and prints the table."""
  config = compat.resolve(config)
  rc = config.relabel
  train = data.load_dataset(config.dataset, "train", config.data_dir)
  test = data.load_dataset(config.dataset, "test", config.data_dir)
  teacher, teacher_vars, meta = squeeze.load_teacher(workdir, train)
  mean, std = compat.pixel_normalisation(config, meta)
  log = files.MetricsLog(pathlib.Path(workdir) / "metrics.jsonl")
  pipeline = input_pipeline.PipelineConfig.from_config(config)
  if rc.synthetic_set:
    sets = {rc.synthetic_set: open_synthetic_set(rc.synthetic_set, meta["image_shape"],
                                                 meta["num_classes"]).images}
  else:
    sets = {m: synthetic_set(workdir, m) for m in config.methods}
  if rc.random_real_baseline:
    sets[RANDOM_REAL] = random_real_set(train, config.ipc, config.seed)
  results = {"dataset": config.dataset, "ipc": config.ipc, "student": rc.student,
             "teacher_test_accuracy": meta["test_accuracy"], "compat": compat.settings(config),
             "normalisation": {"mean": list(mean), "std": list(std)},
             "stages": stage_devices(workdir, meta, [] if rc.synthetic_set else config.methods),
             "sets": {}}
  for name, images in sets.items():
    runs = [train_student(rc, teacher, teacher_vars, images, test, mean, std, seed,
                          f"relabel: {name} seed {seed}", log, pipeline)
            for seed in tqdm.tqdm(rc.seeds, desc=f"relabel: {name}", unit="seed")]
    final_mean, final_std = mean_std([r["final"] for r in runs])
    best_mean, best_std = mean_std([r["best"] for r in runs])
    results["sets"][name] = {"seeds": list(rc.seeds), "runs": runs, "num_images": len(images),
                             "final_mean": final_mean, "final_std": final_std,
                             "best_mean": best_mean, "best_std": best_std}
  table = results_table(results)
  files.write_json(pathlib.Path(workdir) / "results.json", results)
  files.write_bytes(pathlib.Path(workdir) / "results.md",
                    (f"Teacher {meta['model']}: {meta['test_accuracy']:.2f}% test top-1\n\n"
                     + table + "\n").encode())
  print(f"\nStudents ({rc.student}, {rc.epochs} epochs) on {config.dataset}, "
        f"teacher {meta['test_accuracy']:.2f}%:\n{table}")
  return results
