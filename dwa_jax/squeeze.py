"""Squeeze: train a BatchNorm teacher on the real data (or import torchvision weights).

The teacher is saved as an Orbax checkpoint `<workdir>/teacher/variables` plus `teacher.json`
(model, classes, image shape, normalisation, accuracy), which later stages read.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import auto as tqdm

from dwa_jax import convert, data, files, input_pipeline, train_lib
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


def _train_step(model, tx, augment_kind, state, images, y, key, mean, std):
  params, batch_stats, opt_state = state
  dropout_key = jax.random.fold_in(key, 1)
  x = train_lib.augment_views(key, train_lib.normalize(images, mean, std), augment_kind)

  def loss_fn(params):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                  mutable=["batch_stats"], rngs={"dropout": dropout_key})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (updates["batch_stats"], jnp.mean(jnp.argmax(logits, -1) == y))

  (loss, (batch_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return (optax.apply_updates(params, updates), batch_stats, opt_state), loss, acc


def train_teacher(cfg: ml_collections.ConfigDict, train: data.Dataset, test: data.Dataset,
                  seed: int, log: files.MetricsLog,
                  pipeline: input_pipeline.PipelineConfig = input_pipeline.PipelineConfig()):
  """The official teacher recipe: SGD + per-epoch cosine, crop+flip, CE; returns variables."""
  model = build_model(cfg.model, train.num_classes)
  n = len(train.labels)
  batch_size = min(cfg.batch_size, n)
  key = jax.random.key(seed)
  variables = model.init(key, jnp.zeros((1, *train.images.shape[1:]), jnp.float32))
  schedule = train_lib.epoch_schedule(cfg.lr, cfg.epochs, train_lib.steps_per_epoch(n, batch_size),
                                      cfg.warmup_epochs)
  tx = train_lib.make_optimizer(cfg.optimizer, schedule, cfg.weight_decay, cfg.momentum)
  state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
  step = jax.jit(functools.partial(_train_step, model, tx, cfg.augment, mean=train.mean,
                                   std=train.std), donate_argnums=0)
  accuracy = train_lib.make_accuracy_fn(model, train.mean, train.std, pipeline=pipeline)
  batches = input_pipeline.train_batches(train.images, train.labels, batch_size=batch_size,
                                         seed=seed, epochs=cfg.epochs, pipeline=pipeline,
                                         process_index=0, process_count=1)
  test_acc = float("nan")
  bar = tqdm.trange(cfg.epochs, desc="squeeze: teacher", unit="epoch")
  limit = train_lib.DispatchLimit()
  for epoch in bar:
    losses = []
    for i in range(train_lib.steps_per_epoch(n, batch_size)):
      batch = next(batches)
      state, loss, _ = step(state, batch["image"], batch["label"],
                            jax.random.fold_in(key, epoch * 100_003 + i))
      losses.append(loss)
      limit(loss)
    train_loss = float(np.mean(jax.device_get(losses)))
    if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
      test_acc = accuracy({"params": state[0], "batch_stats": state[1]}, test.images, test.labels)
    bar.set_postfix(loss=f"{train_loss:.3f}", test_acc=f"{test_acc:.2f}")
    log.write("squeeze", epoch + 1, train_loss=train_loss, test_accuracy=test_acc)
  return model, {"params": state[0], "batch_stats": state[1]}


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
          "dataset": config.dataset, "test_accuracy": acc, "source": source}
  save_teacher(workdir, variables, meta)
  log.write("squeeze", config.teacher.epochs, final_test_accuracy=acc)
  print(f"squeeze: teacher {config.teacher.model} ({source}) test top-1 {acc:.2f}%")
  return meta
