"""The teacher a squeeze stage leaves in its workdir: `<workdir>/teacher/variables` (an Orbax
checkpoint) and `teacher.json` (model, classes, image shape, normalisation, test accuracy,
where it came from), written last so that its presence marks a complete teacher.
"""

import math

import jax
import orbax.checkpoint as ocp

from dwa_jax import data, errors, files, multihost
from dwa_jax.models import MODELS, build_model, model_template

TEACHER_DIR = "teacher"


class TeacherError(errors.InputError):
  """The teacher checkpoint is missing, corrupt or does not fit the data."""


def teacher_path(workdir):
  return files.absolute(workdir) / TEACHER_DIR


def save_teacher(workdir, variables, meta: dict) -> None:
  """Writes the variables, then the metadata that marks the checkpoint complete. Every process
  calls it (Orbax writes from process 0)."""
  path = teacher_path(workdir)
  lead = jax.process_index() == 0
  if lead:
    path.mkdir(parents=True, exist_ok=True)
    (path / "teacher.json").unlink(missing_ok=True)
  multihost.barrier("teacher-dir")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / "variables", jax.device_get(variables), force=True)
  checkpointer.wait_until_finished()
  if lead:
    files.write_json(path / "teacher.json", meta)
  multihost.barrier("teacher-saved")


def check_teacher(workdir, field: str = "") -> None:
  """Raises TeacherError unless squeeze workdir `workdir` holds a complete teacher checkpoint
  (`field`: the config field that names it, if any)."""
  path = teacher_path(workdir)
  if not (path / "teacher.json").exists():
    if field:
      raise TeacherError(f"{field}: no complete teacher checkpoint in {path} (run the squeeze "
                         "stage in that workdir first)")
    raise TeacherError(f"No complete teacher checkpoint in {path}: run the squeeze stage first "
                       "(--config.stage=squeeze) or set --config.teacher.checkpoint.")


def load_teacher(workdir, dataset: data.Dataset | None = None):
  """Returns (model, variables, meta); checks the teacher fits `dataset` when given."""
  path = teacher_path(workdir)
  check_teacher(workdir)
  meta = read_teacher_meta(path / "teacher.json")
  model = build_model(meta["model"], meta["num_classes"])
  if dataset is not None:
    image_shape = list(dataset.images.shape[1:])
    if meta["num_classes"] != dataset.num_classes:
      raise TeacherError(f"Teacher in {path} has {meta['num_classes']} classes but data set "
                         f"{dataset.name!r} has {dataset.num_classes}.")
    if list(meta["image_shape"]) != image_shape:
      raise TeacherError(f"Teacher in {path} was trained on images of shape {meta['image_shape']} "
                         f"but data set {dataset.name!r} has {image_shape}.")
  template = model_template(model, tuple(meta["image_shape"]))
  try:
    variables = ocp.StandardCheckpointer().restore(path / "variables", template)
  except Exception as e:  # Orbax raises several types for missing/corrupt files.
    raise TeacherError(f"Cannot restore the teacher checkpoint {path / 'variables'}: "
                       f"{type(e).__name__}: {e}") from None
  return model, variables, meta


def load_teachers(workdir, more, train: data.Dataset, field: str, why: str):
  """This workdir's teacher and those of the squeeze workdirs `more`: (models, variables,
  metas), tuples in that order. Every teacher must take the same normalised input; otherwise
  a TeacherError names the config `field` and `why` it needs one normalisation."""
  loaded = [load_teacher(path, train) for path in (workdir, *more)]
  models, variables, metas = (tuple(column) for column in zip(*loaded))
  for path, meta in zip(more, metas[1:]):
    if (meta["mean"], meta["std"]) != (metas[0]["mean"], metas[0]["std"]):
      raise TeacherError(
          f"{field}: the teacher in {path} normalises its input with mean {meta['mean']} and "
          f"std {meta['std']}, this workdir's with {metas[0]['mean']} and {metas[0]['std']}; "
          f"{why}.")
  return models, variables, metas


TEACHER_META_KEYS = ("model", "num_classes", "image_shape", "mean", "std", "test_accuracy")


def read_teacher_meta(path) -> dict:
  """teacher.json, checked: what the later stages read from it is there and well-formed."""
  hint = "; run the squeeze stage again (--config.stage=squeeze) to rewrite the teacher"
  meta = files.read_json(path, "teacher metadata", hint, keys=TEACHER_META_KEYS)
  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
  is_num = lambda v: (is_int(v) or isinstance(v, float)) and math.isfinite(v)
  shape = meta["image_shape"]
  problems = []
  if meta["model"] not in MODELS:
    problems.append(f"unknown model {meta['model']!r}")
  if not (is_int(meta["num_classes"]) and meta["num_classes"] >= 2):
    problems.append(f"num_classes {meta['num_classes']!r} is not an integer >= 2")
  channels = None
  if isinstance(shape, list) and len(shape) == 3 and all(is_int(v) and v > 0 for v in shape):
    channels = shape[-1]
  else:
    problems.append(f"image_shape {shape!r} is not [height, width, channels]")
  for key in ("mean", "std"):
    value = meta[key]
    if not (isinstance(value, list) and all(is_num(v) for v in value)
            and (channels is None or len(value) == channels)):
      problems.append(f"{key} {value!r} is not one finite number per channel")
  if not is_num(meta["test_accuracy"]):
    problems.append(f"test_accuracy {meta['test_accuracy']!r} is not a number")
  if problems:
    raise TeacherError(f"teacher metadata {path}: {'; '.join(problems)}{hint}")
  return meta
