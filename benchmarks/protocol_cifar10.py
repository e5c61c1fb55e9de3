"""Evaluation protocols and synthesis options, CIFAR-10 ConvNet ipc 10, one teacher.

  python benchmarks/protocol_cifar10.py --base_workdir=workdir/reproduce_cifar10_convnet_official \
      --workdir=workdir/protocol --rows=official/base,hard/base,official/dwa_scored

`--base_workdir` is a finished `reproduce_cifar10.py` run (its teacher, its DWA and SRe2L sets
and, for the `official` protocol, its students); `--config` must be that run's config
(default: configs/reproduce_cifar10_convnet_official.py, the official protocol). A row is
PROTOCOL/IMAGES:

* PROTOCOL: the config's relabel settings with one control changed (PROTOCOLS below), or
  `official` (none changed) or `custom` / `custom.NAME` (the `--custom` overrides, for
  combinations; `--custom` may be given once per combination, `NAME:FIELD=VALUE;...`);
* IMAGES: `base` (the base run's DWA and SRe2L sets plus the random real subset), or a DWA set
  synthesised here with one synthesis option (IMAGE_VARIANTS: `dwa_scored`, `dwa_committee`).

Every row trains students over the config's seeds (3) in `<workdir>/runs/<protocol>/<images>/`;
finished students (any run's, with the same settings) are reused, so a rerun or a row shared
with the base run costs nothing. Rows are merged into `<results_dir>/<results_name>.json`
(rows of earlier invocations, or of one running beside it, are kept) and the whole table is
printed. One JSON holds rows over one base run's sets (`base_sets`: their sha256): synthesis
differs across CPUs, so a base run rebuilt elsewhere must take the saved sets
(`reproduce_cifar10.py --sets_from`) or write to another `--results_name`. A row's `seconds`,
`students_trained` and `command` are those of the last invocation that trained any of its
students (a rerun that reuses them all keeps them); the top-level `command` is the latest
invocation's.
"""

import ast
import pathlib
import shutil
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

import common
from dwa_jax import files, presets, provenance, relabel, teacher_store

REPO = pathlib.Path(__file__).resolve().parents[1]

FLAGS = flags.FLAGS

# One protocol control changed from the config's (official) protocol, with the value a later
# paper uses: RDED (batch 50, CutMix, lr floor 0.5), EDC (MSE + 0.025 CE, EMA, ensemble,
# 1,000 epochs), SRe2L's ImageNet relabel (T² factor), and plain hard labels.
PROTOCOLS = {
    "official": {},
    "teacher_eval": {"relabel.teacher_train_mode": False},
    "kl_t2": {"relabel.t2_factor": True},
    "mse_ce": {"relabel.loss": "mse_ce"},
    "ema": {"relabel.ema_decay": 0.99},
    "lr_floor": {"relabel.lr_floor": 0.5},
    "batch_50": {"relabel.batch_size": 50},
    "epochs_1000": {"relabel.epochs": 1000},
    "cutmix": {"relabel.mixing": "cutmix", "relabel.mix_alpha": 1.0},
    "no_mixing": {"relabel.mixing": "none"},
    "ensemble": {},  # relabel.teacher_ensemble = --ensemble_dirs
    "hard": {"relabel.labels": "hard"},
    "custom": {},    # --custom (also custom.NAME)
}

# A DWA set made with one synthesis option (the base run's recover settings otherwise).
IMAGE_VARIANTS = {
    "dwa_scored": {"recover.init": "scored"},
    "dwa_committee": {},  # recover.committee = --committee_dirs
}


def parse_overrides(text: str) -> dict:
  """'relabel.lr_floor=0.5;relabel.ema_decay=0.99' -> {field: value} (values as Python
  literals where they parse, else strings)."""
  out = {}
  for item in filter(None, (s.strip() for s in text.split(";"))):
    field, sep, value = item.partition("=")
    if not sep:
      raise app.UsageError(f"--custom: expected FIELD=VALUE, got {item!r}")
    try:
      out[field.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[field.strip()] = value.strip()
  return out


def with_overrides(base, overrides: dict):
  """common.with_overrides, an unknown field reported as a usage error."""
  try:
    return common.with_overrides(base, overrides)
  except KeyError as e:
    raise app.UsageError(str(e.args[0])) from None


def custom_protocols(values) -> dict:
  """--custom values by protocol name: 'FIELD=VALUE;...' is protocol `custom`,
  'NAME:FIELD=VALUE;...' protocol `custom.NAME` (several combinations in one invocation, each
  row in its own folder and JSON entry)."""
  out = {}
  for text in values:
    head, colon, rest = text.partition(":")
    named = bool(colon) and "=" not in head
    name = f"custom.{head.strip()}" if named else "custom"
    if named and not head.strip().isidentifier():
      raise app.UsageError(f"--custom: a combination's name must be a word, got {head!r}")
    if name in out:
      raise app.UsageError(f"--custom: protocol {name!r} given twice")
    out[name] = parse_overrides(rest if named else text)
  return out


def protocol_overrides(name: str) -> dict:
  """The config fields protocol `name` changes (ensemble and custom: from the flags)."""
  if name == "custom" or name.startswith("custom."):
    customs = custom_protocols(FLAGS.custom)
    if name not in customs:
      raise app.UsageError(f"protocol {name!r} needs --custom='"
                           + ("" if name == "custom" else name[len("custom."):] + ":")
                           + "FIELD=VALUE;FIELD=VALUE'")
    return customs[name]
  if name not in PROTOCOLS:
    raise app.UsageError(f"unknown protocol {name!r}: one of {', '.join(PROTOCOLS)}")
  if name == "ensemble":
    if not FLAGS.ensemble_dirs:
      raise app.UsageError("protocol 'ensemble' needs --ensemble_dirs (squeeze workdirs)")
    return {"relabel.teacher_ensemble": tuple(FLAGS.ensemble_dirs)}
  return PROTOCOLS[name]


def image_overrides(name: str) -> dict:
  """The recover fields image variant `name` changes (committee: from the flags)."""
  if name not in IMAGE_VARIANTS:
    raise app.UsageError(f"unknown images {name!r}: base or one of {', '.join(IMAGE_VARIANTS)}")
  if name == "dwa_committee":
    if not FLAGS.committee_dirs:
      raise app.UsageError("images 'dwa_committee' need --committee_dirs (squeeze workdirs)")
    return {"recover.committee": tuple(FLAGS.committee_dirs)}
  return IMAGE_VARIANTS[name]


def reuse_finished_students(base_workdir: pathlib.Path, workdir: pathlib.Path) -> int:
  """Copies the base run's finished-student results (each with its store's stamp) that this
  row lacks; relabel reuses those whose stamp (settings, images, teacher, seed) is this row's
  and retrains the others. Returns how many were copied."""
  copied = 0
  for result in (base_workdir / "relabel").glob("*/seed_*/result.json"):
    target = workdir / result.relative_to(base_workdir)
    if not target.exists():
      target.parent.mkdir(parents=True, exist_ok=True)
      for name in ("fingerprint.json", "result.json"):
        shutil.copyfile(result.parent / name, target.parent / name)
      copied += 1
  return copied


def synthesise_variant(base, name: str, root: pathlib.Path, base_workdir: pathlib.Path):
  """The DWA set of image variant `name` in <root>/images/<name> (cached by its settings);
  returns (its synthetic/dwa folder, seconds spent)."""
  config = with_overrides(base, image_overrides(name))
  workdir = root / "images" / name
  workdir.mkdir(parents=True, exist_ok=True)
  common.copy_teacher(base_workdir, workdir)
  return workdir / "synthetic" / "dwa", common.cached_recover(config, workdir,
                                                              config.compat_cifar10_std)


def run_row(base, protocol: str, images: str, root: pathlib.Path,
            base_workdir: pathlib.Path) -> dict:
  """Students of one row; returns its record for the JSON."""
  overrides = protocol_overrides(protocol)
  config = with_overrides(base, overrides)
  workdir = root / "runs" / protocol / images
  workdir.mkdir(parents=True, exist_ok=True)
  common.copy_teacher(base_workdir, workdir)
  seconds = {}
  if images == "base":
    sets = {m: base_workdir / "synthetic" / m for m in base.methods}
    with config.unlocked():
      config.relabel.random_real_baseline = True
  else:
    folder, seconds["recover"] = synthesise_variant(base, images, root, base_workdir)
    sets = {"dwa": folder}
    with config.unlocked():
      config.methods, config.relabel.random_real_baseline = ("dwa",), False
  for method, folder in sets.items():
    if not (folder / "manifest.json").exists():
      raise app.UsageError(f"no finished synthetic set in {folder}")
    target = workdir / "synthetic" / method
    same = ((target / "manifest.json").exists() and files.read_json(target / "manifest.json")
            == files.read_json(folder / "manifest.json"))
    if not same:  # a missing copy, or the set was synthesised again
      shutil.rmtree(target, ignore_errors=True)
      shutil.copytree(folder, target)
  reuse_finished_students(base_workdir, workdir)
  start = time.time()
  results = relabel.run(config, workdir)
  seconds["relabel"] = time.time() - start
  trained = sum(p.stat().st_mtime >= start
                for p in (workdir / "relabel").glob("*/seed_*/result.json"))
  sets_out = {}
  for set_name, r in results["sets"].items():
    name = images if (images != "base" and set_name == "dwa") else set_name
    sets_out[name] = common.set_row(r)
    if set_name != relabel.RANDOM_REAL:
      summary = files.read_json(workdir / "synthetic" / set_name / "recover.json")
      sets_out[name]["images_sha256"] = relabel.set_identity(workdir, set_name)
      sets_out[name]["init"] = summary["init"]
      sets_out[name]["committee"] = summary["synthesis"].get("committee", 1)
  return {"protocol": protocol, "images": images, "overrides": overrides,
          "image_overrides": {} if images == "base" else image_overrides(images),
          "card": results["protocol"], "teacher_test_accuracy": results["teacher_test_accuracy"],
          "sets": sets_out, "seconds": seconds, "students_trained": trained}


def base_sets(base, base_workdir: pathlib.Path) -> dict:
  """{method: sha256 of its images.npz} of the base run's synthetic sets."""
  return {m: relabel.set_identity(base_workdir, m) for m in base.methods}


def check_base_sets(out: pathlib.Path, report: dict, sets: dict) -> None:
  """Rows of one JSON compare protocols on the same images: refuses to add rows over other
  base sets than those its rows were measured on (synthesis differs across machines)."""
  if report["rows"] and report.get("base_sets") != sets:
    raise app.UsageError(
        f"{out}: its rows were measured on other base sets ({report.get('base_sets')}) than "
        f"{sets}; write these rows to another --results_name, or build the base run from the "
        "saved sets of those rows (reproduce_cifar10.py --sets_from)")


def merge_row(out: pathlib.Path, report: dict, row: str, record: dict) -> dict:
  """`report` with `row` set to `record`, over the rows now in `out` (read again, so rows that
  another invocation wrote meanwhile are kept). A row whose students were all reused keeps the
  seconds, student count and command of the invocation that trained them."""
  merged = files.read_json(out) if out.exists() else {"rows": {}}
  merged.update({k: v for k, v in report.items() if k != "rows"})
  old = merged["rows"].get(row)
  if old is not None and record["students_trained"] == 0 and "students_trained" in old:
    record = {**record, "seconds": old["seconds"], "students_trained": old["students_trained"],
              "command": old.get("command")}
  merged["rows"][row] = record
  return merged


def table(rows: dict) -> str:
  """One line per (row, set): top-1 final and best, and best minus the official protocol's
  best for the same set."""
  official = {s: r["best_mean"] for row in rows.values() if row["protocol"] == "official"
              and row["images"] == "base" for s, r in row["sets"].items()}
  lines = ["| protocol | images | set | final top-1 (%) | best top-1 (%) | best − official |",
           "|---|---|---|---|---|---|"]
  for row in rows.values():
    for set_name, r in row["sets"].items():
      ref = official.get(set_name, official.get("dwa") if set_name.startswith("dwa") else None)
      delta = "—" if ref is None else f"{r['best_mean'] - ref:+.2f}"
      lines.append(f"| {row['protocol']} | {row['images']} | {set_name} | "
                   f"{common.fmt(r['final_mean'], r['final_std'])} | "
                   f"{common.fmt(r['best_mean'], r['best_std'])} | {delta} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  base = FLAGS.config
  presets.resolve(base)  # checked here; each variant is resolved with its overrides
  base_workdir = pathlib.Path(FLAGS.base_workdir)
  if not (base_workdir / teacher_store.TEACHER_DIR / "teacher.json").exists():
    raise app.UsageError(f"no teacher in {base_workdir}: run benchmarks/reproduce_cifar10.py "
                         "with the same --config first")
  root = pathlib.Path(FLAGS.workdir)
  out = pathlib.Path(FLAGS.results_dir) / f"{FLAGS.results_name}.json"
  report = files.read_json(out) if out.exists() else {"rows": {}}
  sets = base_sets(base, base_workdir)
  check_base_sets(out, report, sets)
  report.update({"provenance": provenance.record(),
                 "command": " ".join([pathlib.Path(sys.argv[0]).name] + sys.argv[1:]),
                 "jax": jax.__version__, "backend": jax.default_backend(),
                 "config": base.to_dict(), "base_sets": sets,
                 "teacher": teacher_store.read_teacher_meta(
                     base_workdir / teacher_store.TEACHER_DIR / "teacher.json")})
  rows = [r.strip() for r in FLAGS.rows.split(",") if r.strip()]
  for row in rows:
    protocol, sep, images = row.partition("/")
    if not sep:
      raise app.UsageError(f"--rows: expected PROTOCOL/IMAGES, got {row!r}")
    protocol_overrides(protocol)
    if images != "base":
      image_overrides(images)
  for row in rows:
    protocol, _, images = row.partition("/")
    started = time.time()
    record = {**run_row(base, protocol, images, root, base_workdir),
              "command": report["command"], "commit": report["provenance"]["commit"]}
    # After every row, so that a long run keeps the rows it has.
    report = merge_row(out, report, row, record)
    files.write_json(out, common.portable(report))
    print(f"{row}: done ({time.time() - started:.0f} s)", flush=True)
  print("\n" + table(report["rows"]))
  print(f"wrote {out}")


def define_flags() -> None:
  """Defined only when run as a script, so tests can import the module."""
  config_flags.DEFINE_config_file(
      "config", str(REPO / "configs" / "reproduce_cifar10_convnet_official.py"),
      "The base run's config (its relabel settings are the `official` protocol).",
      lock_config=True)
  flags.DEFINE_string("base_workdir", None, "A finished reproduce_cifar10.py workdir.")
  flags.DEFINE_string("workdir", str(REPO / "workdir" / "protocol"),
                      "Work directory: runs/<protocol>/<images>/, images/<variant>/.")
  flags.DEFINE_string("rows", "official/base", "Comma-separated PROTOCOL/IMAGES rows; protocols: "
                      + ", ".join(PROTOCOLS) + "; images: base, " + ", ".join(IMAGE_VARIANTS))
  flags.DEFINE_list("ensemble_dirs", [], "Squeeze workdirs of more teachers (protocol ensemble).")
  flags.DEFINE_list("committee_dirs", [], "Squeeze workdirs of more teachers (dwa_committee).")
  flags.DEFINE_multi_string("custom", [], "Overrides of protocol 'custom' (FIELD=VALUE;FIELD="
                            "VALUE) or, given as NAME:FIELD=VALUE;..., of protocol custom.NAME; "
                            "repeat the flag for several combinations")
  flags.DEFINE_string("results_dir", str(REPO / "benchmarks" / "results"), "Where the JSON goes.")
  flags.DEFINE_string("results_name", "protocol_cifar10", "The JSON's name (without .json); one "
                      "JSON holds rows over one base run's sets.")
  flags.mark_flags_as_required(["base_workdir"])


if __name__ == "__main__":
  define_flags()
  app.run(main)
