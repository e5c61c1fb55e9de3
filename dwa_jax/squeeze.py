"""Squeeze: train a BatchNorm teacher on the real data (or import torchvision weights).

The teacher is saved as an Orbax checkpoint `<workdir>/teacher/variables` plus `teacher.json`
(model, classes, image shape, normalisation, accuracy), which later stages read.
"""

import pathlib

import jax
import ml_collections
import optax
import orbax.checkpoint as ocp

from dwa_jax import convert, data, files, input_pipeline, train_lib, train_loop
from dwa_jax.models import build_model

TEACHER_DIR = "teacher"


class TeacherError(ValueError):
  """The teacher checkpoint is missing, corrupt or does not fit the data."""


def teacher_path(workdir) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / TEACHER_DIR


def save_teacher(workdir, variables, meta: dict) -> None:
  """Writes the variables, then the metadata that marks the checkpoint complete."""
  path = teacher_path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / "teacher.json").unlink(missing_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / "variables", jax.device_get(variables), force=True)
  checkpointer.wait_until_finished()
  files.write_json(path / "teacher.json", meta)


def load_teacher(workdir, dataset: data.Dataset | None = None):
  """Returns (model, variables, meta); checks the teacher fits `dataset` when given."""
  path = teacher_path(workdir)
  if not (path / "teacher.json").exists():
    raise TeacherError(f"No complete teacher checkpoint in {path}: run the squeeze stage first "
                       "(--config.stage=squeeze) or set --config.teacher.checkpoint.")
  meta = files.read_json(path / "teacher.json")
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


def teacher_input(augment_kind: str, mean, std) -> train_loop.Prepare:
  """A teacher batch: augmented images, and their labels as the target."""

  def prepare(key, images, labels, aux):
    del aux
    return train_lib.augment_views(key, train_lib.normalize(images, mean, std), augment_kind), labels

  return prepare


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_teacher(cfg: ml_collections.ConfigDict, train: data.Dataset, test: data.Dataset,
                  seed: int, log: files.MetricsLog,
                  pipeline: input_pipeline.PipelineConfig = input_pipeline.PipelineConfig()):
  """The official teacher recipe: SGD + per-epoch cosine, crop+flip, CE; returns variables."""
  model = build_model(cfg.model, train.num_classes)
  state, _ = train_loop.train(
      model, cfg, train.images, train.labels, test, seed=seed, mean=train.mean, std=train.std,
      prepare=teacher_input(cfg.augment, train.mean, train.std), loss=cross_entropy, aux=None,
      evaluate_after=train_loop.eval_epochs(cfg.epochs, cfg.eval_every), log=log,
      log_name="squeeze", desc="squeeze: teacher", pipeline=pipeline)
  return model, state.variables


def import_teacher(cfg: ml_collections.ConfigDict, num_classes: int, image_shape):
  """torchvision-layout state dict (.npz) -> variables of `cfg.model`."""
  model = build_model(cfg.model, num_classes)
  state_dict = convert.load_state_dict(cfg.checkpoint)
  return model, convert.state_dict_to_variables(state_dict, convert.model_template(model, image_shape))


def run(config: ml_collections.ConfigDict, workdir) -> dict:
  """Trains (or imports) the teacher, evaluates it on the test split and saves it."""
  train = data.load_dataset(config.dataset, "train", config.data_dir)
  test = data.load_dataset(config.dataset, "test", config.data_dir)
  log = files.MetricsLog(pathlib.Path(workdir) / "metrics.jsonl")
  pipeline = input_pipeline.PipelineConfig.from_config(config)
  image_shape = train.images.shape[1:]
  if config.teacher.checkpoint:
    model, variables = import_teacher(config.teacher, train.num_classes, image_shape)
    source = f"imported from {config.teacher.checkpoint}"
  else:
    model, variables = train_teacher(config.teacher, train, test, config.seed, log, pipeline)
    source = f"trained for {config.teacher.epochs} epochs"
  acc = train_lib.make_accuracy_fn(model, train.mean, train.std, pipeline=pipeline)(
      variables, test.images, test.labels)
  meta = {"model": config.teacher.model, "num_classes": train.num_classes,
          "image_shape": list(image_shape), "mean": list(train.mean), "std": list(train.std),
          "dataset": config.dataset, "test_accuracy": acc, "source": source,
          # Squeeze trains on one device of process 0 (data-parallel training is issue 13's).
          "stage": {"devices": 1, "processes": 1}}
  save_teacher(workdir, variables, meta)
  log.write("squeeze", config.teacher.epochs, final_test_accuracy=acc)
  print(f"squeeze: teacher {config.teacher.model} ({source}) test top-1 {acc:.2f}%")
  return meta
