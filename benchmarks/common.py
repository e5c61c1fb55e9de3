"""What the benchmark scripts share: a stage cache keyed by settings, the teacher copied into
a run's workdir, the paper's diversity metric D_fea on teacher features, and the rows and
numbers of their JSON and tables. The scripts import it by name (`import common`): run as
`python benchmarks/<script>.py`, their folder is on the import path, as it is for the tests
(pyproject's pytest `pythonpath`)."""

import hashlib
import json
import pathlib
import shutil

import jax
import ml_collections
import numpy as np

from dwa_jax import files, presets, teacher_store, train_lib

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
