"""CIFAR-10 ipc 10 on this CPU: DWA vs SRe2L vs a random real subset, beside the paper's numbers.

  python benchmarks/reproduce_cifar10.py --config=configs/reproduce_cifar10_convnet.py \
      --workdir=workdir/reproduce_cifar10_convnet

1. squeeze: trains the teacher (cached in the workdir: rerunning reuses it);
2. recover: synthesises ipc 10 with DWA and with SRe2L (paper settings; cached);
3. relabel: trains students on each set and on a random real subset of the same size with the
   same online-KD recipe, over the config's seeds (3), final and best top-1, mean ± std;
4. diversity: the paper's D_fea per class (sum over pairs of synthetic images of a class of the
   squared distance between teacher feature maps, the last conv layer before pooling), per method
   and relative to the random real subset;
5. pictures: the synthetic image grids and a PCA plot of teacher features, real test images vs
   each synthetic set.
Prints a table and writes `<results_dir>/reproduce_cifar10_<model>.json` (or `--results_name`)
plus PNGs. Every config field can be overridden (`--config.teacher.epochs=5`,
`--config.relabel.seeds="(0,)"`, `--config.compat=official`).
"""

import json
import pathlib
import shutil
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import numpy as np
from PIL import Image, ImageDraw

import common
from dwa_jax import (data, errors, files, image_files, presets, provenance, recover, relabel,
                     squeeze, synthetic_outputs, teacher_store)

REPO = pathlib.Path(__file__).resolve().parents[1]
# Paper top-1 (%) at CIFAR-10 ipc 10 (SPEC.md); None: not reported for that student.
PAPER = {"convnet": {"dwa": 45.0, "sre2l": None, relabel.RANDOM_REAL: None},
         "resnet18_cifar": {"dwa": 32.6, "sre2l": 27.2, relabel.RANDOM_REAL: None}}

FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------- stage cache


# ----------------------------------------------------------------------------- saved sets
# Synthesis repeated bit for bit on one machine but not on another CPU (float32 results that
# differ in the last bits, carried by 1,000 Adam steps into visibly other images; students on
# them differed by up to 2.5 points, RESULTS.md). Tables that compare protocols on the same sets therefore keep
# the sets: `--save_sets` copies them beside the results, `--sets_from` uses them instead of
# synthesising again.

SETS_FILE = "sets.json"
COPIED_FILES = ("images.npz", "grid.png")
SAVED_FILES = (*COPIED_FILES, "recover.json")  # recover.json is rewritten without machine paths


# Recover fields that, at these values, change nothing in a float32 synthesis on the CPU: left
# out of a saved set's key, so that sets saved without them still match.
NEUTRAL_RECOVER_FIELDS = {"delta_form": "auto", "emulate": "none"}


def saved_sets_keys(config, workdir: pathlib.Path) -> dict:
  """{method: what its saved set must have been synthesised from}: the teacher's weights, the
  data, seed, ipc and synthesis settings (paths relative to the repository, so the keys hold on
  any clone)."""
  train = data.load_dataset(config.dataset, "train", config.data_dir)
  teacher = files.tree_digest(teacher_store.load_teacher(workdir, train)[1])
  recover_fields = {k: v for k, v in config.recover.to_dict().items()
                    if NEUTRAL_RECOVER_FIELDS.get(k, object()) != v}
  return {m: common.fingerprint(teacher, common.portable([config.dataset, config.seed, config.ipc,
                                            config.compat_cifar10_std, recover_fields, m]))
          for m in config.methods}


def save_sets(config, workdir: pathlib.Path, dest: pathlib.Path) -> None:
  """The synthetic sets of this run (images, grid, summary) into `dest/<method>/`, with
  `dest/sets.json` naming what they were synthesised from."""
  record, keys = {"provenance": provenance.record(), "methods": {}}, saved_sets_keys(config, workdir)
  for method in config.methods:
    src, out = workdir / "synthetic" / method, dest / method
    out.mkdir(parents=True, exist_ok=True)
    for name in COPIED_FILES:
      shutil.copyfile(src / name, out / name)
    files.write_json(out / "recover.json", common.portable(files.read_json(src / "recover.json")))
    synthetic_outputs.write_manifest(out, SAVED_FILES)
    record["methods"][method] = {"key": keys[method],
                                 "images_sha256": relabel.set_identity(workdir, method)}
  files.write_json(dest / SETS_FILE, record)


def restore_sets(config, workdir: pathlib.Path, src: pathlib.Path, cache: common.StageCache,
                 teacher_key: str) -> None:
  """Saved sets (`save_sets`) as this run's, marked done, after checking they were synthesised
  from this run's teacher and settings."""
  record = files.read_json(src / SETS_FILE, "saved synthetic sets", keys=("methods",))
  keys = saved_sets_keys(config, workdir)
  for method in config.methods:
    saved = record["methods"].get(method)
    if saved is None:
      raise errors.InputError(f"--sets_from={src}: no {method!r} set saved there")
    if saved["key"] != keys[method]:
      raise errors.InputError(
          f"--sets_from={src}: its {method!r} set was synthesised from another teacher, data or "
          "synthesis settings than this config's; drop --sets_from to synthesise it here")
    out = workdir / "synthetic" / method
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src / method, out)
    cache.mark(f"recover/{method}", recover_key(config, teacher_key, method))


def recover_key(config, teacher_key: str, method: str) -> str:
  return common.fingerprint(teacher_key, config.ipc, config.recover.to_dict(), method)


def run_pipeline(config, workdir: pathlib.Path, sets_from: pathlib.Path | None = None) -> dict:
  """squeeze, recover (per method; or the saved sets in `sets_from`) and relabel, each skipped
  when cached; returns seconds each."""
  cache, seconds = common.StageCache(workdir), {}
  teacher_key = common.fingerprint(config.dataset, config.seed, config.teacher.to_dict())
  if not cache.fresh("squeeze", teacher_key, teacher_store.teacher_path(workdir) / "teacher.json"):
    start = time.time()
    squeeze.run(config, workdir)
    seconds["squeeze"] = time.time() - start
    cache.mark("squeeze", teacher_key)
  if sets_from is not None:
    restore_sets(config, workdir, sets_from, cache, teacher_key)
  for method in config.methods:
    key = recover_key(config, teacher_key, method)
    if not cache.fresh(f"recover/{method}", key,
                       workdir / "synthetic" / method / "manifest.json"):
      start = time.time()
      recover.run(config, workdir, method)
      seconds[f"recover/{method}"] = time.time() - start
      cache.mark(f"recover/{method}", key)
  key = common.fingerprint(teacher_key, config.ipc, config.recover.to_dict(), config.methods,
                    config.relabel.to_dict())
  if not cache.fresh("relabel", key, workdir / "results.json"):
    start = time.time()
    relabel.run(config, workdir)
    seconds["relabel"] = time.time() - start
    cache.mark("relabel", key)
  return seconds


# ----------------------------------------------------------------------------- diversity


# ----------------------------------------------------------------------------- pictures

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def pca_projection(reference: np.ndarray, dims: int = 2):
  """The top principal directions of `reference`: returns x -> (x − mean) @ directions."""
  mu = reference.mean(0)
  _, _, vt = np.linalg.svd(reference - mu, full_matrices=False)
  return lambda x: (x - mu) @ vt[:dims].T


def scatter_png(panels: list, path: pathlib.Path, size: int = 420) -> None:
  """Side-by-side scatter panels (title, real xy, real labels, synthetic xy, synthetic labels):
  real points small and faint, synthetic points as large outlined squares, colour = class."""
  all_xy = np.concatenate([np.concatenate([p[1], p[3]]) for p in panels])
  lo, hi = all_xy.min(0), all_xy.max(0)
  to_px = lambda xy: 20 + (xy - lo) / np.maximum(hi - lo, 1e-12) * (size - 40)
  canvas = Image.new("RGB", (size * len(panels), size + 24), "white")
  draw = ImageDraw.Draw(canvas)
  for k, (title, real_xy, real_y, syn_xy, syn_y) in enumerate(panels):
    ox = k * size
    draw.text((ox + 8, 4), title, fill="black")
    draw.rectangle([ox + 2, 20, ox + size - 2, size + 22], outline=(200, 200, 200))
    for (x, y), c in zip(to_px(real_xy), real_y):
      colour = tuple(int(v + (255 - v) * 0.6) for v in PALETTE[c % 10])
      draw.ellipse([ox + x - 1.5, 24 + y - 1.5, ox + x + 1.5, 24 + y + 1.5], fill=colour)
    for (x, y), c in zip(to_px(syn_xy), syn_y):
      draw.rectangle([ox + x - 4, 24 + y - 4, ox + x + 4, 24 + y + 4], fill=PALETTE[c % 10],
                     outline="black")
  image_files.save_png(path, np.asarray(canvas))


# ----------------------------------------------------------------------------- report


def paper_numbers(config) -> dict:
  """The paper's CIFAR-10 ipc-10 numbers for this student, when that is what was run."""
  if "cifar10" not in config.dataset or "cifar100" in config.dataset or config.ipc != 10:
    return {}
  return PAPER.get(config.relabel.student, {})


def report_table(paper: dict, student: str, results: dict, diversity: dict) -> str:
  lines = [f"| images ({student}, ipc {results['ipc']}) | seeds | final top-1 (%) | "
           "best top-1 (%) | paper (%) | D_fea / real |",
           "|---|---|---|---|---|---|"]
  for name, r in results["sets"].items():
    p = paper.get(name)
    d = diversity.get(name, {}).get("relative_to_real")
    lines.append(f"| {name} | {len(r['seeds'])} | {common.fmt(r['final_mean'], r['final_std'])} | "
                 f"{common.fmt(r['best_mean'], r['best_std'])} | {'—' if p is None else p} | "
                 f"{'—' if d is None else f'{d:.3f}'} |")
  return "\n".join(lines)


def targets(paper: dict, results: dict) -> dict:
  """Issue targets: DWA within 1.5 points of the paper, and >= 3 points above SRe2L (best)."""
  sets = results["sets"]
  out = {}
  paper = paper.get("dwa")
  if "dwa" in sets and paper is not None:
    gap = sets["dwa"]["best_mean"] - paper
    out["dwa_minus_paper"] = gap
    out["dwa_within_1.5_of_paper"] = abs(gap) <= 1.5
  if "dwa" in sets and "sre2l" in sets:
    margin = sets["dwa"]["best_mean"] - sets["sre2l"]["best_mean"]
    out["dwa_minus_sre2l"] = margin
    out["dwa_at_least_3_above_sre2l"] = margin >= 3.0
  return out


def analyse(config, workdir: pathlib.Path, results_dir: pathlib.Path, name: str) -> dict:
  """D_fea per class and method, image grids and the PCA plot."""
  train = data.load_dataset(config.dataset, "train", config.data_dir)
  test = data.load_dataset(config.dataset, "test", config.data_dir)
  model, variables, meta = teacher_store.load_teacher(workdir, train)
  mean, std = tuple(meta["mean"]), tuple(meta["std"])
  sets = {}
  for method in config.methods:
    with np.load(workdir / "synthetic" / method / "images.npz") as f:
      sets[method] = (f["images"], f["labels"])
    shutil.copyfile(workdir / "synthetic" / method / "grid.png",
                    results_dir / f"{name}_{method}_grid.png")
  idx = relabel.random_real_indices(train, config.ipc, config.seed)
  sets[relabel.RANDOM_REAL] = (train.images[idx].astype(np.float32) / 255.0, train.labels[idx])

  teacher_features = common.make_feature_fn(model, variables, mean, std)
  diversity, features = {}, {}
  for set_name, (images, labels) in sets.items():
    features[set_name] = teacher_features(images)
    per_class = common.diversity_per_class(features[set_name], labels, train.num_classes)
    diversity[set_name] = {"per_class": per_class.tolist(), "mean": float(per_class.mean())}
  real_mean = diversity[relabel.RANDOM_REAL]["mean"]
  for d in diversity.values():
    d["relative_to_real"] = d["mean"] / real_mean

  # PCA of teacher features, fitted on (up to) 100 real test images per class.
  per_class = int(min(100, np.bincount(test.labels, minlength=test.num_classes).min()))
  test_idx = data.sample_per_class(test, per_class, config.seed).reshape(-1)
  real_feats = teacher_features(test.images[test_idx].astype(np.float32) / 255.0)
  project = pca_projection(real_feats)
  panels = [(f"{m}: synthetic (squares) vs real test (dots)", project(real_feats),
             test.labels[test_idx], project(features[m]), sets[m][1])
            for m in (*config.methods, relabel.RANDOM_REAL)]
  scatter_png(panels, results_dir / f"{name}_pca.png")
  return diversity


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  config = presets.resolve(FLAGS.config)
  model_name = config.teacher.model
  workdir = pathlib.Path(FLAGS.workdir or REPO / "workdir" / f"reproduce_cifar10_{model_name}")
  workdir.mkdir(parents=True, exist_ok=True)
  results_dir = pathlib.Path(FLAGS.results_dir)
  results_dir.mkdir(parents=True, exist_ok=True)
  started = time.time()
  sets_from = pathlib.Path(FLAGS.sets_from) if FLAGS.sets_from else None
  seconds = run_pipeline(config, workdir, sets_from)
  if FLAGS.save_sets:
    save_sets(config, workdir, pathlib.Path(FLAGS.save_sets))
  results = files.read_json(workdir / "results.json")
  name = FLAGS.results_name or f"reproduce_cifar10_{model_name}"
  diversity = analyse(config, workdir, results_dir, name)
  paper = paper_numbers(config)
  table = report_table(paper, config.relabel.student, results, diversity)
  report = {"provenance": provenance.record(),
            "command": " ".join([pathlib.Path(sys.argv[0]).name] + sys.argv[1:]),
            "jax": jax.__version__, "backend": jax.default_backend(),
            "teacher_test_accuracy": results["teacher_test_accuracy"],
            "teacher_epochs": config.teacher.epochs, "stage_seconds": seconds,
            "total_seconds": time.time() - started, "paper": paper,
            "results": results, "diversity": diversity, "targets": targets(paper, results),
            "config": config.to_dict()}
  out = results_dir / f"{name}.json"
  files.write_json(out, common.portable(report))
  print(f"\nTeacher {model_name} ({config.teacher.epochs} epochs): "
        f"{results['teacher_test_accuracy']:.2f}% test top-1\n\n{table}\n")
  print("targets:", json.dumps(report["targets"]))
  print(f"wrote {out} and PNGs in {results_dir}")


def define_flags() -> None:
  """Defined only when run as a script, so tests can import the module beside dwa_jax.main."""
  config_flags.DEFINE_config_file(
      "config", str(REPO / "configs" / "reproduce_cifar10_convnet.py"),
      "Reproduction config (configs/reproduce_cifar10_*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Work directory (default workdir/reproduce_cifar10_<model>).")
  flags.DEFINE_string("results_dir", str(REPO / "benchmarks" / "results"),
                      "Where the JSON and PNGs go.")
  flags.DEFINE_string("results_name", None, "Name of the JSON and the PNGs' prefix (default "
                      "reproduce_cifar10_<model>), so that a variant (--config.compat=official) "
                      "does not overwrite the main run's results.")
  flags.DEFINE_string("sets_from", None, "Use the synthetic sets saved there (by --save_sets) "
                      "instead of synthesising; refused if they came from another teacher, data "
                      "or synthesis settings.")
  flags.DEFINE_string("save_sets", None, "Copy this run's synthetic sets there (images, grid, "
                      "summary and sets.json), for later runs on the same images.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
