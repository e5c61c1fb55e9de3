"""Squeeze: train a BatchNorm teacher on the real data (or import torchvision weights), evaluate
it on the test split and save it in the workdir (teacher_store.py) for the later stages."""

import os

import jax
import ml_collections
import optax

from dwa_jax import (convert, data, data_parallel, files, input_pipeline, metrics_log, status,
                     store, teacher_store, train_lib, train_loop)
from dwa_jax.models import build_model, model_template


def teacher_input(augment_kind: str, mean, std) -> train_loop.Prepare:
  """A teacher batch: augmented images, and their labels as the target."""

  def prepare(key, images, labels, aux):
    del aux
    return train_lib.augment_views(key, train_lib.normalize(images, mean, std), augment_kind), labels

  return prepare


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def checkpoint_fingerprint(config: ml_collections.ConfigDict) -> dict:
  """What determines a teacher run (a resumed run must match it); the processes because each
  saves its own input-pipeline position."""
  return {"dataset": config.dataset, "data_dir": config.data_dir, "seed": config.seed,
          "teacher": config.teacher.to_dict(), "sync_batch_norm": config.sync_batch_norm,
          "processes": jax.process_count()}


def import_teacher(cfg: ml_collections.ConfigDict, num_classes: int, image_shape):
  """torchvision-layout state dict (.npz) -> variables of `cfg.model`."""
  model = build_model(cfg.model, num_classes)
  state_dict = convert.load_state_dict(cfg.checkpoint)
  try:
    variables = convert.state_dict_to_variables(state_dict,
                                                model_template(model, image_shape))
  except convert.StateDictError as e:  # name the file: the message is about its tensors
    raise convert.StateDictError(f"{cfg.checkpoint}: {e}") from None
  return model, variables


def run(config: ml_collections.ConfigDict, workdir, devices=None) -> dict:
  """Trains (the official recipe: SGD + per-epoch cosine, crop+flip, CE) or imports the teacher
  on every device of every process (or `devices`), evaluates it on the test split and saves it;
  a killed training resumes from `<workdir>/squeeze/checkpoints`."""
  cfg = config.teacher
  train = data.load_dataset(config.dataset, "train", config.data_dir)
  test = data.load_dataset(config.dataset, "test", config.data_dir)
  log = metrics_log.MetricsLog(files.as_path(workdir) / "metrics.jsonl")
  pipeline = input_pipeline.PipelineConfig.from_config(config)
  layout = data_parallel.Layout.from_config(config, devices)
  image_shape = train.images.shape[1:]
  lead = jax.process_index() == 0
  checkpoints = None
  if cfg.checkpoint:
    model, variables = import_teacher(cfg, train.num_classes, image_shape)
    accuracy = train_lib.make_accuracy_fn(model, train.mean, train.std, layout, pipeline=pipeline)
    source = f"imported from {cfg.checkpoint}"
  else:
    if cfg.save_every_epochs:
      checkpoints = train_loop.TrainCheckpoints(store.Store(
          files.as_path(workdir) / "squeeze" / "checkpoints", checkpoint_fingerprint(config),
          "teacher training"), cfg.save_every_epochs)
    trainer = train_loop.Trainer(
        build_model(cfg.model, train.num_classes), cfg, loss=cross_entropy,
        prepare=teacher_input(cfg.augment, train.mean, train.std), mean=train.mean,
        std=train.std, layout=layout, pipeline=pipeline)
    state, _ = trainer.train(
        train.images, train.labels, test, seed=config.seed, aux=None,
        evaluate_after=train_loop.eval_epochs(cfg.epochs, cfg.eval_every), log=log,
        log_name="squeeze", desc="squeeze: teacher", checkpoints=checkpoints)
    if lead:
      log.write("squeeze/compilations", 0, **trainer.compilations())
    model, variables, accuracy = trainer.model, state.variables, trainer.accuracy
    source = f"trained for {cfg.epochs} epochs"
  acc = accuracy(variables, test.images, test.labels)
  meta = {"model": cfg.model, "num_classes": train.num_classes,
          "image_shape": list(image_shape), "mean": list(train.mean), "std": list(train.std),
          "dataset": config.dataset, "test_accuracy": acc, "source": source,
          "stage": {"devices": layout.num_devices, "processes": jax.process_count()}}
  if cfg.checkpoint:
    meta["checkpoint"] = checkpoint_identity(cfg.checkpoint)
  teacher_store.save_teacher(workdir, variables, meta)
  if checkpoints is not None:
    checkpoints.store.remove()
  if lead:
    log.write("squeeze", cfg.epochs, final_test_accuracy=acc)
    status.say(f"squeeze: teacher {cfg.model} ({source}) test top-1 {acc:.2f}%")
  return meta


def checkpoint_identity(path: str) -> str:
  """How teacher.json names the file a teacher was imported from: a local path made absolute,
  so that runs started from other directories recognise it."""
  path = str(path)
  return path if files.is_remote(path) else os.path.abspath(path)


def needs_import(config: ml_collections.ConfigDict, workdir) -> bool:
  """A stage after squeeze with `teacher.checkpoint` set, in a workdir whose teacher is not the
  one imported from that file: the teacher is imported (this stage's `run`) first."""
  if not config.teacher.checkpoint:
    return False
  meta_file = teacher_store.teacher_path(workdir) / "teacher.json"
  if not meta_file.exists():
    return True
  meta = teacher_store.read_teacher_meta(meta_file)
  return meta.get("checkpoint") != checkpoint_identity(config.teacher.checkpoint)
