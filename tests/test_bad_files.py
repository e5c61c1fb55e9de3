"""Generated bad input: every kind of file the project reads, corrupted mechanically, and every
config field given a wrong value. Each case must end with exit status 2 and ONE
`dwa_jax: error: ...` line that names the file (or field), no traceback, and no output written
or overwritten.

The cases are generated from a valid base file of each kind by the mutations below (truncated
at several offsets, random bytes, empty, missing keys, wrong dtype or shape, wrong class count,
negative or non-contiguous labels, one class, NaN ...). All of them run (about a minute);
`test_bad_input_through_the_command_line` runs a few through the real command line as well, where
background threads and interpreter shutdown could still print tracebacks.
"""

import dataclasses
import hashlib
import importlib.util
import io
import json
import pathlib
import shutil
import subprocess
import sys
from typing import Callable

import ml_collections
import numpy as np
import pytest
from PIL import Image

from dwa_jax import convert, presets, teacher_store
from dwa_jax import main as main_lib
from dwa_jax.testing import tiny_config as tiny

REPO = pathlib.Path(__file__).resolve().parents[1]
# Files a failed run may add or append to: logs, and resumable progress.
LOGS = ("metrics.jsonl", "tensorboard/")
PROGRESS = ("progress/", "squeeze/checkpoints/", "relabel/")


# ----------------------------------------------------------------------------- mutations

def byte_mutations(data: bytes) -> dict[str, bytes]:
  """Damage any file could suffer: cut short at several offsets, overwritten, emptied."""
  body = len(data.rstrip())  # a cut in trailing whitespace leaves a valid file
  rng = np.random.default_rng(len(data))
  out = {f"truncated at {f:.0%}": data[:int(body * f)] for f in (0.1, 0.5, 0.9)}
  out["random bytes"] = rng.bytes(len(data))
  out["empty"] = b""
  return out


def array_mutations(arrays: dict, required: tuple, label_key: str | None = "labels",
                    image_key: str | None = "images") -> dict[str, dict]:
  """Structural damage to a dict of arrays (an .npz): missing keys, wrong dtypes and shapes,
  bad labels."""
  out = {}
  for key in required:
    out[f"missing {key}"] = {k: v for k, v in arrays.items() if k != key}
  if image_key:
    images = arrays[image_key]
    out["images float64 out of [0, 1]"] = {**arrays, image_key: images.astype(np.float64) * 3}
    out["images int64"] = {**arrays, image_key: images.astype(np.int64)}
    out["images as text"] = {**arrays, image_key: np.array(["x"] * len(images))}
    out["images 3-D"] = {**arrays, image_key: images.reshape(len(images), images.shape[1], -1)}
    out["fewer images than labels"] = {**arrays, image_key: images[:-1]}
  if label_key:
    labels = arrays[label_key]
    out["labels float"] = {**arrays, label_key: labels.astype(np.float32) + 0.5}
    out["labels 2-D"] = {**arrays, label_key: labels[:, None]}
    out["negative label"] = {**arrays, label_key: np.where(np.arange(len(labels)) == 0, -1, labels)}
    out["one class"] = {**arrays, label_key: np.zeros_like(labels)}
    out["non-contiguous labels"] = {**arrays, label_key: labels * 2}
    if "class_names" in arrays:
      out["fewer class names than labels"] = {**arrays, "class_names": arrays["class_names"][:3]}
  return out


def npz_bytes(arrays: dict) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def jpeg_bytes(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


# ----------------------------------------------------------------------------- cases

@dataclasses.dataclass
class Case:
  kind: str
  name: str
  # (workdir copy, scratch folder) -> config overrides; damages the file it is about.
  prepare: Callable
  names: Callable  # (workdir, scratch) -> the text the error line must contain (file or field)

  @property
  def id(self) -> str:
    return f"{self.kind}: {self.name}"


def replace_file(path: pathlib.Path, data: bytes | None) -> None:
  if data is None:
    path.unlink()
  else:
    path.write_bytes(data)


def digits_like(num: int = 4, size: int = 8, channels: int = 1):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num * 10, size, size, channels), dtype=np.uint8)
  return images, np.tile(np.arange(10), num).astype(np.int64)


def data_npz_cases() -> list[Case]:
  images, labels = digits_like()
  base = {"images": images, "labels": labels}
  variants = {k: npz_bytes(v) for k, v in array_mutations(base, ("images", "labels")).items()}
  variants.update(byte_mutations(npz_bytes(base)))
  variants["images (N, H, W, C) but 2 channels"] = npz_bytes({**base, "images": images.repeat(2, -1)})
  variants["mean/std of the wrong length"] = npz_bytes({**base, "mean": np.zeros(3),
                                                        "std": np.ones(3)})
  variants["std zero"] = npz_bytes({**base, "mean": np.zeros(1), "std": np.zeros(1)})

  return data_file_cases("npz data", "data.npz", "npz", "recover", variants)


def data_file_cases(kind: str, filename: str, source: str, stage: str, variants: dict):
  """One case per variant: its bytes written to scratch/<filename>, read as `source:PATH`."""
  def case(name, blob):
    def prepare(workdir, scratch):
      path = scratch / filename
      path.write_bytes(blob)
      return {"dataset": f"{source}:{path}", "stage": stage}
    return Case(kind, name, prepare, lambda w, s: str(s / filename))
  return [case(n, b) for n, b in variants.items()]


def image_folder_cases() -> list[Case]:
  images, labels = digits_like(size=8, channels=3)
  good = [png_bytes(im) for im in images]

  def write(root, blobs=good, classes=10, suffix=".png"):
    """The training images under root/train (mutated), the good ones again under root/test."""
    for split, images in (("train", blobs), ("test", good)):
      for k, (blob, label) in enumerate(zip(images, labels)):
        if label < classes:
          (root / split / f"c{label}").mkdir(parents=True, exist_ok=True)
          (root / split / f"c{label}" / f"im{k:03d}{suffix}").write_bytes(blob)

  cases = []
  for which in (0, 25):  # the first image (opened up front) and one read during training
    for name, blob in byte_mutations(good[which]).items():
      def prepare(workdir, scratch, which=which, blob=blob):
        write(scratch / "folder", [blob if k == which else b for k, b in enumerate(good)])
        return {"dataset": f"folder:{scratch / 'folder'}", "stage": "squeeze"}
      cases.append(Case("image folder", f"image {which} {name}", prepare,
                        lambda w, s, which=which: f"im{which:03d}.png"))

  def other_size(workdir, scratch):
    big = png_bytes(np.zeros((16, 16, 3), np.uint8))
    write(scratch / "folder", [big if k == 13 else b for k, b in enumerate(good)])
    return {"dataset": f"folder:{scratch / 'folder'}", "stage": "squeeze"}

  def one_class(workdir, scratch):
    write(scratch / "folder", classes=1)
    return {"dataset": f"folder:{scratch / 'folder'}", "stage": "squeeze"}

  def empty_class(workdir, scratch):
    write(scratch / "folder")
    for f in (scratch / "folder" / "train" / "c4").iterdir():
      f.unlink()
    return {"dataset": f"folder:{scratch / 'folder'}", "stage": "squeeze"}

  def no_classes(workdir, scratch):
    (scratch / "folder" / "train").mkdir(parents=True)
    (scratch / "folder" / "test").mkdir()
    (scratch / "folder" / "train" / "readme.txt").write_text("no images")
    return {"dataset": f"folder:{scratch / 'folder'}", "stage": "squeeze"}

  def no_splits(workdir, scratch):  # PATH/<class>/: one set of images for both splits
    write(scratch / "folder")
    for split in ("train", "test"):
      for cls in (scratch / "folder" / split).iterdir():
        cls.rename(scratch / "folder" / f"{cls.name}_{split}")
      (scratch / "folder" / split).rmdir()
    return {"dataset": f"folder:{scratch / 'folder'}", "stage": "squeeze"}

  def text_as_png(workdir, scratch):
    write(scratch / "folder", [b"not an image\n" if k == 7 else b for k, b in enumerate(good)])
    return {"dataset": f"folder:{scratch / 'folder'}", "stage": "squeeze"}

  folder = lambda w, s: str(s / "folder")
  cases += [Case("image folder", "image of another size", other_size, lambda w, s: "im013.png"),
            Case("image folder", "one class", one_class, folder),
            Case("image folder", "class without images", empty_class, folder),
            Case("image folder", "no class folders", no_classes, folder),
            Case("image folder", "no train/ and test/ sub-folders", no_splits, folder),
            Case("image folder", "text file named .png", text_as_png, lambda w, s: "im007.png")]
  return cases


def cifar10_jpeg_arrays() -> dict:
  out = {"class_names": np.array([f"class{c}" for c in range(10)])}
  for split, per_class in (("train", 4), ("test", 2)):
    images, labels = digits_like(per_class, size=8, channels=3)
    blobs = [jpeg_bytes(im) for im in images]
    out[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), np.uint8)
    out[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    out[f"{split}_labels"] = labels
  return out


def cifar10_jpeg_cases() -> list[Case]:
  base = cifar10_jpeg_arrays()
  keys = ("train_jpeg", "train_offsets", "train_labels", "test_jpeg", "test_offsets",
          "test_labels", "class_names")
  variants = {k: npz_bytes(v) for k, v in array_mutations(base, keys, "train_labels", None).items()}
  variants.update(byte_mutations(npz_bytes(base)))
  offsets = base["train_offsets"]
  variants["offsets beyond the bytes"] = npz_bytes({**base, "train_offsets": offsets * 2})
  variants["offsets decreasing"] = npz_bytes({**base, "train_offsets": offsets[::-1].copy()})
  variants["fewer offsets than labels"] = npz_bytes({**base, "train_offsets": offsets[:-5]})
  damaged = base["train_jpeg"].copy()
  damaged[offsets[3]:offsets[4]] = 0
  variants["one JPEG zeroed"] = npz_bytes({**base, "train_jpeg": damaged})

  return data_file_cases("CIFAR-10 JPEG file", "cifar.npz", "cifar10_jpeg", "squeeze", variants)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> pathlib.Path:
  from dwa_jax import testing
  root = tmp_path_factory.mktemp("tfds")
  testing.build(root, "cifar10", per_class=2, test_per_class=1, image_size=8)
  return root


def tfds_cases() -> list[Case]:
  """Damage to a prepared tfds data_dir (a locally built cifar10 in ArrayRecord)."""
  cases = []
  targets = {"dataset_info.json": "dataset_info.json", "features.json": "features.json",
             "train shard": "cifar10-train.array_record-00000-of-00001"}
  for label, filename in targets.items():
    def mutations(data):
      out = dict(byte_mutations(data))
      out["deleted"] = None
      return out
    for name in ("truncated at 10%", "truncated at 50%", "random bytes", "empty", "deleted"):
      def prepare(workdir, scratch, filename=filename, name=name):
        data_dir = scratch / "tfds"
        shutil.copytree(TFDS_BASE[0], data_dir)
        path = next(data_dir.rglob(filename))
        replace_file(path, mutations(path.read_bytes())[name])
        return {"dataset": "cifar10", "data_dir": str(data_dir), "stage": "squeeze"}
      cases.append(Case("tfds data_dir", f"{label} {name}", prepare,
                        lambda w, s: str(s / "tfds")))
  return cases


TFDS_BASE: list = []  # set by the fixture chain below (the built data_dir)


def state_dict(finished) -> dict:
  _, variables, _ = teacher_store.load_teacher(finished)
  return convert.variables_to_state_dict(variables)


def safetensors_bytes(tensors: dict) -> bytes:
  header, offset, blobs = {}, 0, []
  codes = {np.dtype("float32"): "F32", np.dtype("int64"): "I64", np.dtype("float64"): "F64"}
  for name, value in tensors.items():
    value = np.ascontiguousarray(value)
    raw = value.astype(value.dtype.newbyteorder("<")).tobytes()
    header[name] = {"dtype": codes[value.dtype], "shape": list(value.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    blobs.append(raw)
    offset += len(raw)
  head = json.dumps(header).encode()
  return len(head).to_bytes(8, "little") + head + b"".join(blobs)


def state_dict_cases() -> list[Case]:
  cases = []
  for suffix in (".npz", ".safetensors", ".pth"):
    def variants(sd, suffix=suffix):
      first = sorted(sd)[0]
      conv = next(k for k in sorted(sd) if sd[k].ndim == 4)
      structural = {
          "missing a tensor": {k: v for k, v in sd.items() if k != first},
          "no tensors": {},
          "a tensor of the wrong shape": {**sd, conv: sd[conv][..., :1, :1]},
          "NaN weights": {**sd, conv: np.full_like(sd[conv], np.nan)},
          "integer weights": {**sd, conv: sd[conv].astype(np.int64)},
      }
      if suffix == ".npz":
        structural["text weights"] = {**sd, conv: np.array(["w"])}
      encode = npz_bytes if suffix == ".npz" else safetensors_bytes
      out = {}
      if suffix != ".pth":
        out = {k: encode(v) for k, v in structural.items()}
        base = encode(sd)
      else:
        base = npz_bytes(sd)  # not a torch file at all: what torch.load sees for damage
      out.update(byte_mutations(base))
      return out

    for name in ("truncated at 10%", "truncated at 50%", "truncated at 90%", "random bytes",
                 "empty", "missing a tensor", "no tensors", "a tensor of the wrong shape",
                 "NaN weights", "integer weights", "text weights"):
      if (suffix == ".pth" and name in ("missing a tensor", "no tensors", "a tensor of the "
                                        "wrong shape", "NaN weights", "integer weights",
                                        "text weights")) or (name == "text weights" and
                                                             suffix != ".npz"):
        continue

      def prepare(workdir, scratch, suffix=suffix, name=name, variants=variants):
        path = scratch / f"teacher{suffix}"
        path.write_bytes(variants(state_dict(workdir))[name])
        return {"teacher.checkpoint": str(path), "stage": "squeeze"}
      cases.append(Case(f"teacher checkpoint {suffix}", name, prepare,
                        lambda w, s, suffix=suffix: str(s / f"teacher{suffix}")))
  return cases


def teacher_dir_cases() -> list[Case]:
  """The Orbax teacher in <workdir>/teacher: its files damaged, teacher.json damaged."""
  cases = []
  for name in ("truncated at 50%", "random bytes", "empty", "deleted"):
    for which in ("manifest", "metadata", "data"):  # the files a restore reads
      def prepare(workdir, scratch, name=name, which=which):
        found = [p for p in (workdir / "teacher" / "variables").rglob("*") if p.is_file()]
        path = {"data": lambda: max(found, key=lambda p: p.stat().st_size),  # the arrays
                "manifest": lambda: workdir / "teacher" / "variables" / "manifest.ocdbt",
                "metadata": lambda: workdir / "teacher" / "variables" / "_METADATA"}[which]()
        replace_file(path, None if name == "deleted" else byte_mutations(path.read_bytes())[name])
        return {"stage": "recover"}
      cases.append(Case("teacher (Orbax)", f"{which} file {name}", prepare,
                        lambda w, s: str(w / "teacher")))

  def json_case(name, edit):
    def prepare(workdir, scratch):
      path = workdir / "teacher" / "teacher.json"
      edit(path)
      return {"stage": "recover"}
    cases.append(Case("teacher (Orbax)", f"teacher.json {name}", prepare,
                      lambda w, s: str(w / "teacher" / "teacher.json")))

  def set_key(key, value):
    def edit(path):
      meta = json.loads(path.read_text())
      if value is KeyError:
        del meta[key]
      else:
        meta[key] = value
      path.write_text(json.dumps(meta))
    return edit

  for name in ("truncated at 50%", "random bytes", "empty"):
    json_case(name, lambda p, name=name: p.write_bytes(byte_mutations(p.read_bytes())[name]))
  for key in ("model", "num_classes", "image_shape", "mean", "std"):
    json_case(f"without {key}", set_key(key, KeyError))
  json_case("num_classes as text", set_key("num_classes", "ten"))
  json_case("image_shape of two numbers", set_key("image_shape", [8, 8]))
  json_case("unknown model", set_key("model", "resnet1000"))
  json_case("a list instead of an object", lambda p: p.write_text("[1, 2]"))
  return cases


def synthetic_set_cases() -> list[Case]:
  """<workdir>/synthetic/dwa/images.npz (what relabel trains on) and an external npz set."""
  cases = []

  def arrays(workdir):
    with np.load(workdir / "synthetic" / "dwa" / "images.npz") as f:
      return {k: f[k] for k in f.files}

  def mutations(base):
    out = {k: npz_bytes(v) for k, v in array_mutations(base, ("images",), None).items()}
    images = base["images"]
    out["NaN pixels"] = npz_bytes({**base, "images": np.full_like(images, np.nan)})
    out["pixels above 1"] = npz_bytes({**base, "images": images + 2.0})
    out["images of another size"] = npz_bytes({**base, "images": images.repeat(2, 1).repeat(2, 2)})
    out.update(byte_mutations(npz_bytes(base)))
    return out

  names = ("missing images", "images float64 out of [0, 1]", "images int64", "images as text",
           "images 3-D", "NaN pixels", "pixels above 1", "images of another size",
           "truncated at 10%", "truncated at 50%", "truncated at 90%", "random bytes", "empty")
  for name in names:
    def prepare(workdir, scratch, name=name):
      path = workdir / "synthetic" / "dwa" / "images.npz"
      path.write_bytes(mutations(arrays(workdir))[name])
      return {"stage": "relabel"}
    cases.append(Case("synthetic set", name, prepare,
                      lambda w, s: str(w / "synthetic" / "dwa" / "images.npz")))

    def external(workdir, scratch, name=name):
      path = scratch / "set.npz"
      base = arrays(workdir)
      path.write_bytes(mutations({"images": base["images"], "labels": base["labels"]})[name])
      return {"stage": "relabel", "relabel.synthetic_set": f"npz:{path}"}
    cases.append(Case("external synthetic set", name, external, lambda w, s: str(s / "set.npz")))
  for target in ("manifest.json", "recover.json"):
    for name in ("truncated at 50%", "random bytes", "empty"):
      def prepare(workdir, scratch, target=target, name=name):
        path = workdir / "synthetic" / "dwa" / target
        path.write_bytes(byte_mutations(path.read_bytes())[name])
        return {"stage": "relabel"}
      cases.append(Case("synthetic set", f"{target} {name}", prepare,
                        lambda w, s, target=target: str(w / "synthetic" / "dwa" / target)))
  return cases


def progress_cases() -> list[Case]:
  """Progress files of an interrupted run: recover's finished batches and settings stamp, and
  the squeeze and relabel resume checkpoints and per-seed results."""
  cases = []
  progress_names = ("truncated at 50%", "random bytes", "empty")
  for target in ("done/batch_00000_000.npz", "fingerprint.json"):
    for name in progress_names:
      def prepare(workdir, scratch, target=target, name=name):
        path = PROGRESS_BASE[0] / "recover" / "progress" / "dwa" / target
        dest = workdir / "progress" / "dwa"
        shutil.copytree(PROGRESS_BASE[0] / "recover" / "progress" / "dwa", dest)
        path = dest / target
        path.write_bytes(byte_mutations(path.read_bytes())[name])
        return {"stage": "recover", "ipc": 2}
      cases.append(Case("recover progress", f"{target} {name}", prepare,
                        lambda w, s, target=target: str(w / "progress" / "dwa" / target)))
  for stage, sub in (("squeeze", "squeeze/checkpoints"), ("relabel", "relabel")):
    for which in ("fingerprint.json", "a checkpoint file") + (("result.json",) if stage ==
                                                             "relabel" else ()):
      for name in progress_names:
        def prepare(workdir, scratch, stage=stage, sub=sub, which=which, name=name):
          shutil.rmtree(workdir / sub, ignore_errors=True)  # as the killed run left it
          shutil.copytree(PROGRESS_BASE[0] / stage / sub, workdir / sub)
          if which == "result.json":
            (workdir / RELABEL_RESULT[0]).write_bytes(RELABEL_RESULT[1])
          if which == "a checkpoint file":
            path = max((p for p in (workdir / sub).rglob("*") if p.is_file()
                        and "steps" in p.parts), key=lambda p: p.stat().st_size)
          else:
            path = next((workdir / sub).rglob(which))
          path.write_bytes(byte_mutations(path.read_bytes())[name])
          return {"stage": stage, "teacher.epochs": 2, "relabel.epochs": 2,
                  "teacher.save_every_epochs": 1, "relabel.save_every_epochs": 1}
        cases.append(Case(f"{stage} progress", f"{which} {name}", prepare,
                          lambda w, s, sub=sub: str(w / sub)))
  return cases


PROGRESS_BASE: list = []


def config_value_cases() -> list[Case]:
  """Every config field: a value of the wrong type, NaN and infinity (floats), a value out of
  range; every section: a mistyped field name. Built as a plain dict, as a config file that
  makes its own ConfigDict could (the command line checks types itself)."""
  defaults = presets.base_config().to_dict()
  cases = []

  def leaves(tree, prefix=()):
    for key, value in tree.items():
      if isinstance(value, dict):
        yield from leaves(value, prefix + (key,))
      else:
        yield prefix + (key,), value

  def bad_values(path, value):
    if isinstance(value, bool):
      return {"wrong type": "yes"}
    if isinstance(value, int):
      return {"wrong type": "3", "negative": -1}
    if isinstance(value, float):
      return {"wrong type": "0.1", "NaN": float("nan"), "infinite": float("inf"), "negative": -1.0}
    if isinstance(value, str):
      return {"wrong type": 3}
    if isinstance(value, tuple):
      return {"wrong type": 7}
    if value is None:  # quirk switches: None (follow compat) or a bool
      return {"wrong type": "yes"}
    return {}

  extra = {("teacher", "momentum"): {"above 1": 1.5}, ("relabel", "momentum"): {"above 1": 1.5},
           ("relabel", "mix_alpha"): {"zero": 0.0}}
  for path, value in leaves(defaults):
    for name, bad in {**bad_values(path, value), **extra.get(path, {})}.items():
      def prepare(workdir, scratch, path=path, bad=bad):
        return {"__raw__": (path, bad)}
      cases.append(Case("config field", f"{'.'.join(path)} {name}", prepare,
                        lambda w, s, path=path: ".".join(path)))
  for section in ("", "teacher", "recover", "relabel", "pipeline"):
    tree = defaults[section] if section else defaults
    field = sorted(k for k, v in tree.items() if not isinstance(v, dict))[0]
    typo = field[:-1] + ("x" if field[-1] != "x" else "y")
    path = (section, typo) if section else (typo,)
    cases.append(Case("config field", f"mistyped {'.'.join(path)}",
                      lambda w, s, path=path: {"__raw__": (path, 1)},
                      lambda w, s, path=path: ".".join(path)))
  return cases


def all_cases() -> list[Case]:
  return (data_npz_cases() + image_folder_cases() + cifar10_jpeg_cases() + tfds_cases()
          + state_dict_cases() + teacher_dir_cases() + synthetic_set_cases() + progress_cases()
          + config_value_cases())


CASES = all_cases()
HAVE_TORCH = importlib.util.find_spec("torch") is not None


def with_marks(case):
  """A damaged .pth can only be told apart from a missing torch where torch is installed (the
  `torch` extra); without it every .pth case would end in the 'needs torch' line, which checks
  nothing of the damage: those cases skip with the reason instead."""
  needs_torch = case.kind == "teacher checkpoint .pth" and not HAVE_TORCH
  return pytest.param(case, id=case.id, marks=pytest.mark.skipif(
      needs_torch, reason="needs torch (pip install -e '.[torch]') to read a .pth"))


# ----------------------------------------------------------------------------- the check

@pytest.fixture(scope="module")
def finished(tiny_run, tmp_path_factory, tfds_dir):
  """A workdir holding a complete run (teacher, synthetic set, results); the tfds base; and
  progress left by interrupted runs of each stage."""
  TFDS_BASE[:] = [tfds_dir]
  path = tmp_path_factory.mktemp("finished") / "run"
  shutil.copytree(tiny_run, path)
  PROGRESS_BASE[:] = [interrupted_runs(path, tmp_path_factory.mktemp("interrupted"))]
  return path


def interrupted_runs(finished: pathlib.Path, root: pathlib.Path) -> pathlib.Path:
  """Progress as a killed run leaves it: recover's finished batches and settings stamp (ipc 2,
  one batch done), and squeeze/relabel checkpoints after epoch 1 of 2."""
  from dwa_jax import recover, store, data
  work = root / "recover"
  shutil.copytree(finished, work)
  config = tiny()
  config.ipc = 2
  train = data.load_dataset(config.dataset, "train", config.data_dir)
  model, variables, meta = teacher_store.load_teacher(work, train)
  progress = recover.synthesize_owned(presets.resolve(config), work, "dwa", train, model, variables, meta)
  progress.done_path(1, 0).unlink()  # as if killed during the second batch
  keep = store.Store._close  # pylint: disable=protected-access
  store.Store._close = lambda self, delete: None  # leave the steps, as a kill would
  try:
    for stage in ("squeeze", "relabel"):
      shutil.copytree(finished, root / stage)
      config = tiny()
      config.stage = stage
      config.teacher.epochs = config.relabel.epochs = 2
      config.teacher.save_every_epochs = config.relabel.save_every_epochs = 1
      assert main_lib.execute(config, root / stage) == 0
  finally:
    store.Store._close = keep
  # Killed while training the student: its checkpoint is there, its result not yet (kept
  # aside for the cases about a damaged result).
  result = next((root / "relabel" / "relabel").rglob("result.json"))
  RELABEL_RESULT[:] = [result.relative_to(root / "relabel"), result.read_bytes()]
  result.unlink()
  return root


RELABEL_RESULT: list = []


def snapshot(root: pathlib.Path) -> dict:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  raw = overrides.pop("__raw__", None)
  for key, value in overrides.items():
    section, _, field = key.rpartition(".")
    (config[section] if section else config)[field] = value
  if raw is not None:  # outside the ConfigDict's type checks, as a config file's own dict
    path, value = raw
    tree = config.to_dict()
    node = tree
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = value
    config = ml_collections.ConfigDict(tree)
  return config


@pytest.mark.parametrize("case", [with_marks(c) for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(finished, tmp_path, capfd, case):
  workdir, scratch = tmp_path / "w", tmp_path / "scratch"
  shutil.copytree(finished, workdir)
  scratch.mkdir()
  overrides = case.prepare(workdir, scratch)
  config = apply_overrides(tiny(), dict(overrides))
  before = snapshot(workdir)
  capfd.readouterr()
  status = main_lib.execute(config, workdir)
  err = capfd.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("dwa_jax: error:")]
  assert status == 2, (status, err[-1500:])
  assert len(errors) == 1, err[-1500:]
  assert "Traceback" not in err, err[-3000:]
  assert case.names(workdir, scratch) in errors[0], errors[0]
  after = snapshot(workdir)
  unlogged = lambda snap: {k: v for k, v in snap.items() if not k.startswith(LOGS)}
  assert {k: v for k, v in unlogged(after).items() if k in before} == unlogged(before)
  added = [k for k in after if k not in before and not k.startswith(LOGS + PROGRESS)]
  assert not added, added                        # no output written, not even partly
  assert not [k for k in after if k.endswith(".tmp")]


def command_line(config_flags: dict, workdir) -> list[str]:
  """The tiny config of these tests as command-line flags, plus `config_flags`."""
  flags = {"methods": "('dwa',)", "ipc": 1, "teacher.epochs": 1, "recover.iterations": 2,
           "recover.adjust_steps": 1, "relabel.epochs": 1, "relabel.seeds": "(0,)",
           "relabel.random_real_baseline": False, **config_flags}
  return [sys.executable, "-m", "dwa_jax.main", "--config=configs/demo_digits.py",
          f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in flags.items())]


@pytest.mark.parametrize("case_id", ["teacher (Orbax): data file truncated at 50%",
                                     "tfds data_dir: train shard truncated at 50%",
                                     "npz data: truncated at 50%"])
def test_bad_input_through_the_command_line(finished, tmp_path, case_id):
  case = next(c for c in CASES if c.id == case_id)
  workdir, scratch = tmp_path / "w", tmp_path / "scratch"
  shutil.copytree(finished, workdir)
  scratch.mkdir()
  overrides = case.prepare(workdir, scratch)
  proc = subprocess.run(command_line(overrides, workdir), cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  lines = [line for line in proc.stderr.splitlines() if line.strip()
           and not line.startswith("\r") and "%|" not in line]  # progress bars aside
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("dwa_jax: error:"), lines[-5:]
  assert case.names(workdir, scratch) in lines[0]


def test_every_kind_is_generated():
  kinds = {c.kind for c in CASES}
  assert {"npz data", "image folder", "CIFAR-10 JPEG file", "tfds data_dir",
          "teacher checkpoint .npz", "teacher checkpoint .safetensors", "teacher checkpoint .pth",
          "teacher (Orbax)", "synthetic set", "external synthetic set", "recover progress",
          "squeeze progress", "relabel progress", "config field"} <= kinds
  assert len({c.id for c in CASES}) == len(CASES)


# ----------------------------------------------------------------------------- config files

CONFIG_FILES = {
    "syntax error": "def get_config(:\n",
    "no get_config": "X = 1\n",
    "get_config raises": "def get_config():\n  raise RuntimeError('boom')\n",
    "returns a dict": "def get_config():\n  return {'ipc': 1}\n",
    "returns None": "def get_config():\n  return None\n",
    "mistyped field": ("from dwa_jax import presets\n\ndef get_config():\n"
                       "  c = presets.demo_digits()\n  c.teacher.epochz = 1\n  return c\n"),
    "wrong type in file": ("from dwa_jax import presets\n\ndef get_config():\n"
                           "  c = presets.demo_digits()\n  c.ipc = 'ten'\n  return c\n"),
    "empty file": "",
}


@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_bad_config_file_is_one_line_exit_2(tmp_path, name):
  path = tmp_path / "bad_config.py"
  path.write_text(CONFIG_FILES[name])
  proc = subprocess.run([sys.executable, "-m", "dwa_jax.main", f"--config={path}",
                         f"--workdir={tmp_path / 'w'}"], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in lines if line.startswith("dwa_jax: error:")]
  assert len(errors) == 1 and (str(path) in errors[0] or "epochz" in errors[0]), lines[-5:]
  assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())


def test_random_bytes_never_bring_advice_to_unpickle(tmp_path):
  """numpy suggests allow_pickle for a file that is not .npy/.npz: unpickling an untrusted
  file runs its code, so the message says what the file is not instead."""
  from dwa_jax import convert, data  # pylint: disable=g-import-not-at-top
  path = tmp_path / "teacher.npz"
  path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  with pytest.raises(convert.StateDictError, match="is not a .npz state dict") as teacher:
    convert.load_state_dict(str(path))
  with pytest.raises(data.DataError, match="not a NumPy .npz/.npy file") as dataset:
    data.load_npz(path)
  for error in (teacher, dataset):
    assert "pickle" not in str(error.value).lower()
