"""What the benchmark scripts share: a stage cache keyed by settings, the teacher copied into
a run's workdir, the paper's diversity metric D_fea on teacher features, and the rows and
numbers of their JSON and tables. The scripts import it by name (`import common`): run as
`python benchmarks/<script>.py`, their folder is on the import path, as it is for the tests
(pyproject's pytest `pythonpath`)."""

import hashlib
import json
import pathlib
import shutil
import time

from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from dwa_jax import data, files, presets, squeeze, teacher_store, train_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def with_overrides(base: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """The resolved config `base` with `overrides` ({'section.field' or 'field': value}) set;
  an unknown field raises KeyError."""
  c = base.copy_and_resolve_references()
  with c.unlocked():
    for field, value in overrides.items():
      section, _, key = field.rpartition(".")
      node = c[section] if section else c
      if key not in node:
        raise KeyError(f"unknown config field {field!r}")
      node[key] = value
  return presets.resolve(c)


def fingerprint(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class StageCache:
  """Skips a stage whose outputs exist and whose settings are unchanged."""

  def __init__(self, workdir: pathlib.Path):
    self.path = workdir / "stage_cache.json"
    self.done = files.read_json(self.path) if self.path.exists() else {}

  def fresh(self, stage: str, key: str, output: pathlib.Path) -> bool:
    return self.done.get(stage) == key and output.exists()

  def mark(self, stage: str, key: str) -> None:
    self.done[stage] = key
    files.write_json(self.path, self.done)


def copy_teacher(teacher_dir: pathlib.Path, workdir: pathlib.Path) -> None:
  """The teacher of squeeze workdir `teacher_dir` into `workdir`, unless it holds a complete
  one (teacher.json is written last)."""
  if not (workdir / teacher_store.TEACHER_DIR / "teacher.json").exists():
    shutil.copytree(teacher_dir / teacher_store.TEACHER_DIR, workdir / teacher_store.TEACHER_DIR,
                    dirs_exist_ok=True)


def cached_recover(config, workdir: pathlib.Path, *key_parts) -> float:
  """DWA's set of `config` in `workdir/synthetic/dwa`, synthesised unless the stage cache holds
  it for the same recover settings, seed, ipc and `key_parts`: the seconds spent (0 if cached)."""
  from dwa_jax import recover  # pylint: disable=g-import-not-at-top
  cache = StageCache(workdir)
  key = fingerprint(config.recover.to_dict(), config.seed, config.ipc, *key_parts)
  if cache.fresh("recover/dwa", key, workdir / "synthetic" / "dwa" / "manifest.json"):
    return 0.0
  start = time.time()
  recover.run(config, workdir, "dwa")
  cache.mark("recover/dwa", key)
  return time.time() - start


def batch_means(workdir: pathlib.Path, keys) -> dict:
  """The mean over the synthetic batches of each of `keys` in DWA's recover.json."""
  batches = files.read_json(workdir / "synthetic" / "dwa" / "recover.json")["batches"]
  return {k: float(np.mean([b[k] for b in batches])) for k in keys}


def requested_rows(argv, is_row, allowed: str) -> list[str]:
  """The --rows of a benchmark made of rows, each checked by `is_row` (a usage error naming
  `allowed` otherwise); no positional arguments; absl's info logging off."""
  from absl import app, logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  rows = [r for r in flags.FLAGS.rows.split(",") if r]
  for row in rows:
    if not is_row(row):
      raise app.UsageError(f"--rows: {row!r} is not {allowed}")
  return rows


def row_teacher(base, root: pathlib.Path):
  """The teacher of a benchmark made of rows, imported once (squeeze, into `root/teacher`) and
  copied into each row's workdir (`copy_teacher`): the training set, and (model, variables,
  meta)."""
  config = with_overrides(base, {"stage": "squeeze"})
  if not (root / "teacher" / teacher_store.TEACHER_DIR / "teacher.json").exists():
    (root / "teacher").mkdir(parents=True, exist_ok=True)
    squeeze.run(config, root / "teacher")
  train = data.load_dataset(config.dataset, "train", config.data_dir)
  return train, teacher_store.load_teacher(root / "teacher", train)


def make_feature_fn(model, variables, mean, std, batch_size: int = 500):
  """images01 -> flattened last conv feature map (before pooling) of the teacher, eval mode.
  Compiled once per teacher and batch shape, shared by every image set."""
  feats = jax.jit(lambda x: model.apply(variables, train_lib.normalize(x, mean, std), train=False,
                                        features=True)[1])

  def features(images01: np.ndarray) -> np.ndarray:
    out = [np.asarray(feats(images01[s:s + batch_size]))
           for s in range(0, len(images01), batch_size)]
    return np.concatenate(out).reshape(len(images01), -1).astype(np.float64)

  return features


def diversity_per_class(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """D_fea^c = Σ_i Σ_j ‖g(s_i^c) − g(s_j^c)‖² over the images of class c (both orders)."""
  out = np.zeros(num_classes)
  for c in range(num_classes):
    f = features[labels == c]
    sq = np.sum(f * f, axis=1)
    out[c] = np.sum(sq[:, None] + sq[None, :] - 2.0 * f @ f.T)
  return out


def portable(obj):
  """`obj` with paths inside the repository, or beside it (../shared), written relative to the
  repository: results JSON is committed and must not name this machine's folders."""
  text = json.dumps(obj)
  text = text.replace(str(REPO) + "/", "").replace(str(REPO.parent) + "/", "../")
  return json.loads(text)


def set_row(result: dict) -> dict:
  """One set of a relabel results.json, as the benchmarks' JSON keeps it: top-1 final and best
  (mean, std over seeds) and each seed's final and best."""
  row = {k: result[k] for k in ("final_mean", "final_std", "best_mean", "best_std")}
  row["runs"] = [{"seed": s, "final": x["final"], "best": x["best"]}
                 for s, x in zip(result["seeds"], result["runs"])]
  return row


def fmt(mean: float, std: float) -> str:
  return f"{mean:.2f} ± {std:.2f}"


def define_row_flags(name: str, rows: str, rows_help: str, results_help: str) -> None:
  """The flags of a benchmark made of rows over one base config, one teacher and one JSON:
  --config (default: the official CIFAR-10 protocol with the saved teacher), --workdir
  (workdir/<name>), --rows, --results_dir, --results_name (<name>)."""
  config_flags.DEFINE_config_file(
      "config", str(REPO / "configs" / "reproduce_cifar10_convnet_official.py"),
      "The base config: data, teacher, synthesis and the students' protocol.", lock_config=True)
  flags.DEFINE_string("workdir", f"workdir/{name}", "Work directory (teacher, one folder per "
                      "row).")
  flags.DEFINE_string("rows", rows, rows_help)
  flags.DEFINE_string("results_dir", str(REPO / "benchmarks" / "results"),
                      "Where the results go.")
  flags.DEFINE_string("results_name", name, results_help)
