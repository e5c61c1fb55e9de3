"""Squeeze: train a BatchNorm teacher on the real data (or import torchvision weights).

The teacher is saved as an Orbax checkpoint `<workdir>/teacher/variables` plus `teacher.json`
(model, classes, image shape, normalisation, accuracy), which later stages read.
"""

import math

import jax
import ml_collections
import optax
import orbax.checkpoint as ocp

from dwa_jax import (convert, data, data_parallel, files, input_pipeline, multihost,
                     train_checkpoints, train_lib, train_loop)
from dwa_jax.models import build_model

TEACHER_DIR = "teacher"


class TeacherError(files.InputError):
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
  template = convert.model_template(model, tuple(meta["image_shape"]))
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
  from dwa_jax.models import MODELS  # pylint: disable=g-import-not-at-top
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


def teacher_input(augment_kind: str, mean, std) -> train_loop.Prepare:
  """A teacher batch: augmented images, and their labels as the target."""

  def prepare(key, images, labels, aux):
    del aux
    return train_lib.augment_views(key, train_lib.normalize(images, mean, std), augment_kind), labels

  return prepare


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_teacher(cfg: ml_collections.ConfigDict, train: data.Dataset, test: data.Dataset,
                  seed: int, log: files.MetricsLog, layout: data_parallel.Layout,
                  pipeline: input_pipeline.PipelineConfig, checkpoints=None):
  """The official teacher recipe: SGD + per-epoch cosine, crop+flip, CE, data-parallel over
  `layout`; returns (model, variables, the accuracy function)."""
  model = build_model(cfg.model, train.num_classes)
  trainer = train_loop.Trainer(model, cfg, prepare=teacher_input(cfg.augment, train.mean, train.std),
                               loss=cross_entropy, mean=train.mean, std=train.std, layout=layout,
                               pipeline=pipeline)
  state, _ = trainer.train(
      train.images, train.labels, test, seed=seed, aux=None,
      evaluate_after=train_loop.eval_epochs(cfg.epochs, cfg.eval_every), log=log,
      log_name="squeeze", desc="squeeze: teacher", checkpoints=checkpoints)
  if jax.process_index() == 0:
    log.write("squeeze/compilations", 0, **trainer.compilations())
  return model, state.variables, trainer.accuracy


def checkpoint_fingerprint(config: ml_collections.ConfigDict) -> dict:
  """What determines a teacher run (a resumed run must match it); the processes because each
  saves its own input-pipeline position."""
  return {"dataset": config.dataset, "data_dir": config.data_dir, "seed": config.seed,
          "teacher": config.teacher.to_dict(), "sync_batch_norm": config.get("sync_batch_norm"),
          "processes": jax.process_count()}


def import_teacher(cfg: ml_collections.ConfigDict, num_classes: int, image_shape):
  """torchvision-layout state dict (.npz) -> variables of `cfg.model`."""
  model = build_model(cfg.model, num_classes)
  state_dict = convert.load_state_dict(cfg.checkpoint)
  try:
    variables = convert.state_dict_to_variables(state_dict,
                                                convert.model_template(model, image_shape))
  except convert.StateDictError as e:  # name the file: the message is about its tensors
    raise convert.StateDictError(f"{cfg.checkpoint}: {e}") from None
  return model, variables


def run(config: ml_collections.ConfigDict, workdir, devices=None) -> dict:
  """Trains (or imports) the teacher on every device of every process (or `devices`),
  evaluates it on the test split and saves it. A killed training resumes from
  `<workdir>/squeeze/checkpoints` (every `teacher.save_every_epochs` epochs)."""
  train = data.load_dataset(config.dataset, "train", config.data_dir)
  test = data.load_dataset(config.dataset, "test", config.data_dir)
  log = files.MetricsLog(files.as_path(workdir) / "metrics.jsonl")
  pipeline = input_pipeline.PipelineConfig.from_config(config)
  layout = data_parallel.Layout.from_config(config, devices)
  image_shape = train.images.shape[1:]
  checkpoints = None
  if config.teacher.checkpoint:
    model, variables = import_teacher(config.teacher, train.num_classes, image_shape)
    accuracy = train_lib.make_accuracy_fn(model, train.mean, train.std, layout, pipeline=pipeline)
    source = f"imported from {config.teacher.checkpoint}"
  else:
    if config.teacher.save_every_epochs:
      checkpoints = train_checkpoints.TrainCheckpoints(
          files.as_path(workdir) / "squeeze" / "checkpoints", checkpoint_fingerprint(config),
          config.teacher.save_every_epochs)
    model, variables, accuracy = train_teacher(config.teacher, train, test, config.seed, log,
                                               layout, pipeline, checkpoints)
    source = f"trained for {config.teacher.epochs} epochs"
  acc = accuracy(variables, test.images, test.labels)
  meta = {"model": config.teacher.model, "num_classes": train.num_classes,
          "image_shape": list(image_shape), "mean": list(train.mean), "std": list(train.std),
          "dataset": config.dataset, "test_accuracy": acc, "source": source,
          "stage": {"devices": layout.num_devices, "processes": jax.process_count()}}
  save_teacher(workdir, variables, meta)
  if checkpoints is not None:
    checkpoints.remove()
  if jax.process_index() == 0:
    log.write("squeeze", config.teacher.epochs, final_test_accuracy=acc)
    print(f"squeeze: teacher {config.teacher.model} ({source}) test top-1 {acc:.2f}%")
  return meta
