"""Where synthesis pays: student accuracy against DWA's synthesis length T, from real images.

  python benchmarks/synthesis_curve.py [--rows=t0,t25,t100,t250,t1000,real_s1,real_s2]
      [--workdir=workdir/synthesis_curve] [--config=configs/reproduce_cifar10_convnet_official.py]
      [--config.FIELD=VALUE ...]

CIFAR-10 ipc 10, ConvNet-128, the saved teacher the config imports, students under the config's
protocol (official by default) over its seeds. A row is one image set:

* `tN`: DWA run for T = N iterations from the real images `sample_per_class(config.seed)`;
  `t0` is those starting images themselves (a random real subset drawn by the synthesis rule);
* `real_sK`: the random real baseline's subset at seed K (`relabel.random_real_set`), which
  shows how much the choice of real images alone moves accuracy.

Per row: students (final and best top-1, per seed), and for the DWA rows the pixel distance
from the starting images (RMSE and PSNR in [0, 1] pixels), D_fea (the paper's diversity, on the
teacher's last feature map) absolute and relative to the starting images, and the final CE
and BN loss (mean over the synthetic batches). Rows already finished (the same settings) are
reused; each row's exact command is kept. Writes benchmarks/results/synthesis_curve.json and
synthesis_curve.png (best top-1 against T, with the random real subsets as a band), or
`--results_name`.{json,png} for a variant:

  python benchmarks/synthesis_curve.py --results_name=synthesis_curve_best_protocol \
      --workdir=workdir/synthesis_curve_best_protocol --rows=t0,t100,t1000 \
      --config.relabel.batch_size=50 --config.relabel.lr_floor=0.5 --config.relabel.epochs=1000
"""

import pathlib
import re
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image, ImageDraw

import common
from dwa_jax import data, files, image_files, provenance, relabel

FLAGS = flags.FLAGS


def row_config(base, row: str, workdir: pathlib.Path):
  """The resolved config of one row, its set given to relabel as `npz:` where it is written
  here rather than synthesised."""
  overrides = {"methods": ("dwa",), "relabel.random_real_baseline": False, "stage": "relabel"}
  if row.startswith("t") and row != "t0":
    overrides["recover.iterations"] = int(row[1:])
  else:
    overrides["relabel.synthetic_set"] = f"npz:{workdir / 'set.npz'}"
  return common.with_overrides(base, overrides)


def start_rows(train, config) -> np.ndarray:
  """Training-image indices of the starting images, in images.npz order (ipc index, class)."""
  return data.sample_per_class(train, config.ipc, config.seed).reshape(-1)


def write_real_set(path: pathlib.Path, train, indices) -> None:
  files.save_npz(path, images=np.asarray(train.images[indices], np.uint8),
                 labels=train.labels[indices].astype(np.int32))


def synthesis_metrics(workdir, train, config, features) -> dict:
  """Pixel distance from the starting images, D_fea and the final losses of a DWA set."""
  with np.load(workdir / "synthetic" / "dwa" / "images.npz") as f:
    images, labels = f["images"], f["labels"]
  out = {"d_fea": float(common.diversity_per_class(features(images), labels,
                                                   train.num_classes).mean()),
         **common.batch_means(workdir, ("final_ce", "final_bn_loss"))}
  if starts_from_sample(config):
    start = np.asarray(train.images[start_rows(train, config)], np.float32) / 255.0
    rmse = float(np.sqrt(np.mean((images - start) ** 2)))
    out.update(rmse_from_start=rmse, psnr_from_start_db=float(20 * np.log10(1.0 / rmse)))
  return out


def starts_from_sample(config) -> bool:
  """Whether DWA starts from `sample_per_class(config.seed)` (init real, the default), so that
  `t0` and the pixel distance from the start are defined."""
  return config.recover.init in ("auto", "real")


def run_row(base, row: str, root: pathlib.Path, train, features) -> dict:
  workdir = root / row
  workdir.mkdir(parents=True, exist_ok=True)
  common.copy_teacher(root / "teacher", workdir)
  config = row_config(base, row, workdir)
  record, start = {"row": row}, time.time()
  if row == "t0" or row.startswith("real_s"):
    seed = config.seed if row == "t0" else int(row[len("real_s"):])
    indices = (start_rows(train, config) if row == "t0"
               else relabel.random_real_indices(train, config.ipc, seed))
    write_real_set(workdir / "set.npz", train, indices)
    images = np.asarray(train.images[indices], np.float32) / 255.0
    record["d_fea"] = float(common.diversity_per_class(
        features(images), train.labels[indices], train.num_classes).mean())
    record["image_seed"] = seed
    if row == "t0":
      record["iterations"] = 0
  else:
    common.cached_recover(config, workdir)
    record.update(synthesis_metrics(workdir, train, config, features))
    record["iterations"] = config.recover.iterations
  results = relabel.run(config, workdir)
  (result,) = results["sets"].values()
  record.update(common.set_row(result))
  record["seconds"] = time.time() - start
  record["card"] = results["protocol"]
  return record


def plot(rows: dict, path: pathlib.Path, width: int = 640, height: int = 400) -> None:
  """Best top-1 (mean and ± std over students) against T (log scale, T = 0 at the left), the
  random real subsets' range as a grey band."""
  curve = sorted((r["iterations"] if "iterations" in r else 0, r["best_mean"], r["best_std"])
                 for name, r in rows.items() if name.startswith("t"))
  reals = [r["best_mean"] for name, r in rows.items() if name.startswith("real_s")]
  if "t0" in rows:
    reals.append(rows["t0"]["best_mean"])
  values = [m + s for _, m, s in curve] + [m - s for _, m, s in curve] + reals
  lo, hi = np.floor(min(values) - 1), np.ceil(max(values) + 1)
  left, right, top, bottom = 60, width - 20, 20, height - 50
  x_of = lambda t: left + (right - left) * np.log10(1 + t) / np.log10(1 + 1000)
  y_of = lambda v: bottom - (bottom - top) * (v - lo) / (hi - lo)
  canvas = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(canvas)
  if reals:
    draw.rectangle([left, y_of(max(reals)), right, y_of(min(reals))], fill=(225, 225, 225))
  draw.line([left, top, left, bottom, right, bottom], fill="black")
  for v in np.arange(lo, hi + 1e-9, max(1, round((hi - lo) / 8))):
    draw.text((8, y_of(v) - 6), f"{v:.0f}", fill="black")
  for t in (0, 25, 100, 250, 1000):
    draw.text((x_of(t) - 10, bottom + 8), str(t), fill="black")
  draw.text((left, height - 22), "DWA iterations T (log(1 + T) scale); grey: random real subsets",
            fill="black")
  draw.text((left + 5, 2), "best top-1 (%), ConvNet students, mean ± std", fill="black")
  points = [(x_of(t), y_of(m)) for t, m, _ in curve]
  if len(points) > 1:
    draw.line(points, fill=(31, 119, 180), width=2)
  for t, m, s in curve:
    draw.line([x_of(t), y_of(m + s), x_of(t), y_of(m - s)], fill=(31, 119, 180))
    draw.ellipse([x_of(t) - 3, y_of(m) - 3, x_of(t) + 3, y_of(m) + 3], fill=(31, 119, 180))
  image_files.save_png(path, np.asarray(canvas))


def main(argv):
  rows = common.requested_rows(
      argv, lambda r: (r.startswith("real_s") and r[len("real_s"):].isdigit()
                       or r.startswith("t") and r[1:].isdigit()), "tN or real_sK")
  base = FLAGS.config
  root = pathlib.Path(FLAGS.workdir)
  if "t0" in rows and not starts_from_sample(base):
    raise app.UsageError(f"--rows: t0 is the images sample_per_class gives, which recover.init="
                         f"{base.recover.init!r} does not start from")
  train, (model, variables, meta) = common.row_teacher(base, root)
  features = common.make_feature_fn(model, variables, tuple(meta["mean"]), tuple(meta["std"]))
  out = pathlib.Path(FLAGS.results_dir) / f"{FLAGS.results_name}.json"
  report = files.read_json(out) if out.exists() else {"rows": {}}
  command = provenance.command()
  for row in rows:
    record = run_row(base, row, root, train, features)
    record["command"] = re.sub(r" --rows=\S+", "", command) + f" --rows={row}"
    report["rows"][row] = common.portable(record)
    report["provenance"] = provenance.record()
    report["teacher_test_accuracy"] = meta["test_accuracy"]
    files.write_json(out, report)  # after every row: a stopped run keeps the rows done
  start = report["rows"].get("t0", {}).get("d_fea")
  for r in report["rows"].values():
    if start:
      r["d_fea_relative_to_start"] = r["d_fea"] / start
  files.write_json(out, report)
  plot(report["rows"], out.with_suffix(".png"))
  print("| row | T | best top-1 | final top-1 | RMSE | PSNR dB | D_fea | CE | BN |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name, r in sorted(report["rows"].items()):
    cells = [f"{r[k]:{f}}" if k in r else "—" for k, f in (
        ("rmse_from_start", ".4f"), ("psnr_from_start_db", ".1f"), ("d_fea", ".1f"),
        ("final_ce", ".4f"), ("final_bn_loss", ".3f"))]
    print(f"| {name} | {r.get('iterations', '—')} | {common.fmt(r['best_mean'], r['best_std'])} | "
          f"{common.fmt(r['final_mean'], r['final_std'])} | {' | '.join(cells)} |")


def define_flags() -> None:
  common.define_row_flags(
      "synthesis_curve", "t0,t25,t100,t250,t1000,real_s1,real_s2",
      "Comma-separated rows: tN (DWA, T = N; t0 = the starting images) or real_sK (the random "
      "real subset at seed K).",
      "Name of the JSON and the plot, one per variant of the base config (another protocol, "
      "init=scored): rows are reused only within one file.")


if __name__ == "__main__":
  define_flags()
  flags.adopt_module_key_flags(common)  # their --help lists the shared flags
  app.run(main)
