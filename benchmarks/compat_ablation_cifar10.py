"""Which of the authors' quirks moves accuracy: CIFAR-10 ConvNet ipc 10, one teacher, DWA.

  python benchmarks/compat_ablation_cifar10.py --teacher_dir=workdir/ablation_teacher \
      --workdir=workdir/compat_ablation

Variants (dwa_jax/compat.py), DWA: `clean` (our defaults); each quirk alone (`cifar10_std`,
`q1`, `jpeg`, `teacher_train_mode`, `eval_epochs`); `official` (`--config.compat=official`: all
of them). Every variant synthesises (or, where only relabel changes, reuses the clean synthetic
set), then trains students over the config's seeds with online soft labels. The variants
`random_real_*` and `sre2l_*` train on the random real subset and on SRe2L images under both
protocols, so the whole reproduction is on record under both. Per variant: top-1 (final and best, mean ± std over seeds), the pixel
statistics of the images students train on (std, fraction at 0 or 255) and of the lossless last
iterate, and the paper's diversity D_fea relative to the random real subset. Stages already
done are reused on a rerun. Writes `<results_dir>/compat_ablation_cifar10.json` and prints a
table.
"""

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

import common
from dwa_jax import (compat, data, files, image_files, presets, provenance, recover, relabel,
                     synthetic_outputs, teacher_store)

REPO = pathlib.Path(__file__).resolve().parents[1]

FLAGS = flags.FLAGS

# name -> (switches set on top of the clean default, variant whose synthetic set it reuses or
# None to synthesise its own, methods; random_real_* train on the random real subset only).
# `jpeg` changes only the outputs, so it re-encodes the clean last iterate (what the recover
# stage's write_outputs does with recover.compat_jpeg) instead of synthesising it again.
VARIANTS = {
    "clean": ({}, None, ("dwa",)),
    "cifar10_std": ({"compat_cifar10_std": True}, None, ("dwa",)),
    "q1": ({"recover.compat_q1": True}, None, ("dwa",)),
    "jpeg": ({"recover.compat_jpeg": True}, "clean", ("dwa",)),
    "teacher_train_mode": ({"relabel.teacher_train_mode": True}, "clean", ("dwa",)),
    "eval_epochs": ({"relabel.compat_eval_epochs": True}, "clean", ("dwa",)),
    "official": ({"compat": "official"}, None, ("dwa",)),
    "random_real_clean": ({}, None, ()),
    "random_real_official": ({"compat": "official"}, None, ()),
    "sre2l_clean": ({}, None, ("sre2l",)),
    "sre2l_official": ({"compat": "official"}, None, ("sre2l",)),
}


def variant_config(base, name: str):
  switches, _, methods = VARIANTS[name]
  return common.with_overrides(base, {"methods": methods, **switches,
                                      "relabel.random_real_baseline":
                                          name.startswith("random_real")})


def to_jpeg(out: pathlib.Path) -> None:
  """A lossless synthetic set turned into the authors' format: images.npz then holds the
  decoded JPEGs (compat.jpeg_roundtrip), images_lossless.npz the last iterate."""
  with np.load(out / "images.npz") as f:
    arrays = dict(f)
  files.save_npz(out / "images_lossless.npz", **arrays)
  arrays["images"] = compat.jpeg_roundtrip(arrays["images"])
  files.save_npz(out / "images.npz", **arrays)
  summary = files.read_json(out / "recover.json")
  summary["format"] = "jpeg_q75"
  summary["pixel_statistics"]["jpeg"] = image_files.pixel_statistics(arrays["images"])
  files.write_json(out / "recover.json", summary)
  # The rewritten files' digests, so relabel's manifest check accepts the set.
  listed = files.read_json(out / "manifest.json")["files"]
  synthetic_outputs.write_manifest(out, dict.fromkeys([*listed, "images_lossless.npz"]))


def run_variant(base, name: str, root: pathlib.Path, teacher_dir: pathlib.Path) -> dict:
  """Synthesis (or a copy of the reused set), then relabel; cached by settings."""
  config = variant_config(base, name)
  _, reuse, methods = VARIANTS[name]
  workdir = root / name
  workdir.mkdir(parents=True, exist_ok=True)
  common.copy_teacher(teacher_dir, workdir)
  cache = common.StageCache(workdir)
  seconds = {}
  for method in methods:
    out = workdir / "synthetic" / method
    source = variant_config(base, reuse) if reuse else config
    key = common.fingerprint(source.recover.to_dict(), source.compat_cifar10_std,
                                        source.seed, source.ipc, method, reuse)
    if cache.fresh(f"recover/{method}", key, out / "manifest.json"):
      continue
    start = time.time()
    if reuse:
      if not (root / reuse / "synthetic" / method / "manifest.json").exists():
        raise app.UsageError(f"variant {name} reuses the images of {reuse}: run {reuse} first")
      shutil.rmtree(out, ignore_errors=True)
      shutil.copytree(root / reuse / "synthetic" / method, out)
      if config.recover.compat_jpeg:
        to_jpeg(out)
    else:
      recover.run(config, workdir, method)
    seconds[f"recover/{method}"] = time.time() - start
    cache.mark(f"recover/{method}", key)
  key = common.fingerprint(config.to_dict(), reuse)
  if not cache.fresh("relabel", key, workdir / "results.json"):
    start = time.time()
    relabel.run(config, workdir)
    seconds["relabel"] = time.time() - start
    cache.mark("relabel", key)
  return {"config": config, "workdir": workdir, "seconds": seconds}


def diversity(config, workdir: pathlib.Path, methods) -> dict:
  """D_fea of each synthetic set relative to the random real subset (teacher features, with
  the normalisation the variant feeds the teacher)."""
  train = data.load_dataset(config.dataset, "train", config.data_dir)
  model, variables, meta = teacher_store.load_teacher(workdir, train)
  features = common.make_feature_fn(model, variables,
                                               *compat.pixel_normalisation(config, meta))
  idx = relabel.random_real_indices(train, config.ipc, config.seed)
  real = common.diversity_per_class(
      features(train.images[idx].astype(np.float32) / 255.0), train.labels[idx],
      train.num_classes).mean()
  out = {relabel.RANDOM_REAL: 1.0}
  for method in methods:
    with np.load(workdir / "synthetic" / method / "images.npz") as f:
      d = common.diversity_per_class(features(f["images"]), f["labels"],
                                                train.num_classes)
    out[method] = float(d.mean() / real)
  return out


def teacher_accuracy(config, teacher_dir: pathlib.Path, batch_size: int = 128) -> dict:
  """The teacher's test top-1 (%) under our and the authors' CIFAR-10 std, in eval mode
  (running BN statistics) and in train mode (statistics of each batch of `batch_size` test
  images in a fixed shuffled order, as the relabel teacher sees mixed batches)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dwa_jax import train_lib  # pylint: disable=g-import-not-at-top
  test = data.load_dataset(config.dataset, "test", config.data_dir)
  model, variables, meta = teacher_store.load_teacher(teacher_dir, test)
  order = np.random.default_rng(0).permutation(len(test.labels))
  order = order[:len(order) // batch_size * batch_size].reshape(-1, batch_size)
  out = {}
  for std_name, std in (("teacher_std", meta["std"]), ("official_std", compat.OFFICIAL_CIFAR10_STD)):
    for mode in ("eval", "train"):
      predict = jax.jit(lambda x, std=std, mode=mode: jnp.argmax(model.apply(
          variables, train_lib.normalize(x, meta["mean"], std), train=mode == "train",
          mutable=["batch_stats"])[0], -1))
      hits = sum(int(np.sum(np.asarray(predict(test.images[b])) == test.labels[b])) for b in order)
      out[f"{std_name}_{mode}_mode"] = 100.0 * hits / order.size
  return out


def summarise(name: str, run: dict) -> dict:
  config, workdir = run["config"], run["workdir"]
  results = files.read_json(workdir / "results.json")
  sets = {}
  for set_name, r in results["sets"].items():
    row = common.set_row(r)
    if set_name != relabel.RANDOM_REAL:
      summary = files.read_json(workdir / "synthetic" / set_name / "recover.json")
      stats = summary["pixel_statistics"]
      row["pixels_trained_on"] = stats.get("jpeg", stats["lossless"])
      row["pixels_lossless"] = stats["lossless"]
      row["delta_norm_mean"] = float(np.mean([b["delta_norm"] for b in summary["batches"]]))
    sets[set_name] = row
  for set_name, value in diversity(config, workdir, VARIANTS[name][2]).items():
    if set_name in sets:
      sets[set_name]["d_fea_relative_to_real"] = value
  return {"switches": compat.settings(config), "normalisation": results["normalisation"],
          "teacher_test_accuracy": results["teacher_test_accuracy"], "sets": sets,
          "stage_seconds": run["seconds"]}


def table(report: dict) -> str:
  lines = ["| variant | images | final top-1 (%) | best top-1 (%) | pixel std | at 0/255 | "
           "lossless std | lossless at 0/255 | D_fea / real |", "|---|---|---|---|---|---|---|---|---|"]
  for name, v in report["variants"].items():
    for set_name, r in v["sets"].items():
      px, ll = r.get("pixels_trained_on"), r.get("pixels_lossless")
      cells = ([f"{px['std']:.3f}", f"{100 * px['clipped_fraction']:.1f} %",
                f"{ll['std']:.3f}", f"{100 * ll['clipped_fraction']:.1f} %"]
               if px else ["—"] * 4)
      d = r.get("d_fea_relative_to_real")
      lines.append(f"| {name} | {set_name} | "
                   f"{common.fmt(r['final_mean'], r['final_std'])} | "
                   f"{common.fmt(r['best_mean'], r['best_std'])} | " + " | ".join(cells)
                   + f" | {'—' if d is None else f'{d:.3f}'} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  base = FLAGS.config
  presets.resolve(base)  # checked here; each variant is resolved with its switches
  root = pathlib.Path(FLAGS.workdir)
  teacher_dir = pathlib.Path(FLAGS.teacher_dir)
  if not (teacher_dir / teacher_store.TEACHER_DIR / "teacher.json").exists():
    raise app.UsageError(f"no teacher in {teacher_dir}/{teacher_store.TEACHER_DIR}: train one with "
                         "`python -m dwa_jax.main --config=... --config.stage=squeeze`")
  names = [n.strip() for n in FLAGS.variants.split(",")] if FLAGS.variants else list(VARIANTS)
  started = time.time()
  report = {"provenance": provenance.record(),
            "command": " ".join([pathlib.Path(sys.argv[0]).name] + sys.argv[1:]),
            "jax": jax.__version__, "backend": jax.default_backend(), "variants": {}}
  report["config"] = base.to_dict()
  report["teacher_test_accuracy"] = teacher_accuracy(base, teacher_dir)
  print("teacher:", report["teacher_test_accuracy"], flush=True)
  out = pathlib.Path(FLAGS.results_dir) / "compat_ablation_cifar10.json"
  for name in names:  # reused sets come first in VARIANTS order
    run = run_variant(base, name, root, teacher_dir)
    report["variants"][name] = summarise(name, run)
    report["total_seconds"] = time.time() - started
    # After every variant, so that a long run keeps the rows it has.
    files.write_json(out, common.portable(report))
    print(f"{name}: done ({time.time() - started:.0f} s)", flush=True)
  print("\n" + table(report))
  print(f"wrote {out}")


if __name__ == "__main__":
  config_flags.DEFINE_config_file(
      "config", str(REPO / "configs" / "reproduce_cifar10_convnet.py"),
      "Base config (the clean CIFAR-10 reproduction settings).", lock_config=True)
  flags.DEFINE_string("workdir", str(REPO / "workdir" / "compat_ablation"),
                      "Work directory: one sub-folder per variant.")
  flags.DEFINE_string("teacher_dir", None, "A work directory holding the teacher (teacher/).")
  flags.DEFINE_string("variants", "", "Comma-separated subset of: " + ", ".join(VARIANTS))
  flags.DEFINE_string("results_dir", str(REPO / "benchmarks" / "results"), "Where the JSON goes.")
  flags.mark_flags_as_required(["teacher_dir"])
  app.run(main)
