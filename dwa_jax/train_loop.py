"""The one training loop of squeeze (teacher, cross-entropy on labels) and relabel (students,
KD on online teacher logits): a `TrainState`, a pure `train_step`, and `fit`, which runs epochs
of input-pipeline batches, evaluates after the chosen epochs and logs.

What differs between the two stages is `prepare`: how a batch of images and labels becomes the
model's input and the loss's target (augmentation, mixing, the teacher's logits), and `loss`.
"""

import functools
import time
from typing import Any, Callable

from flax.training import train_state
import jax
import numpy as np
import optax
from tqdm import auto as tqdm

from dwa_jax import files, input_pipeline, train_lib


class TrainState(train_state.TrainState):
  """Parameters, optimizer state and step, plus the BatchNorm running statistics."""
  batch_stats: Any = None

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}


def create_state(model, key, image_shape, tx: optax.GradientTransformation) -> TrainState:
  variables = model.init(key, np.zeros((1, *image_shape), np.float32))
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables["batch_stats"])


# prepare(key, images, labels, aux) -> (model input, loss target); loss(logits, target) -> scalar
Prepare = Callable[[Any, Any, Any, Any], tuple[Any, Any]]
Loss = Callable[[Any, Any], Any]


def train_step(state: TrainState, images, labels, key, aux, *, prepare: Prepare,
               loss: Loss) -> tuple[TrainState, Any]:
  """One optimizer step on one batch; `aux` carries what `prepare` needs besides the batch (the
  teacher's variables in relabel). Students with dropout or stochastic depth draw it from
  fold_in(key, 1), which leaves `prepare`'s stream as it was."""
  x, target = prepare(key, images, labels, aux)

  def loss_fn(params):
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x,
                                     train=True, mutable=["batch_stats"],
                                     rngs={"dropout": jax.random.fold_in(key, 1)})
    return loss(logits, target), updates["batch_stats"]

  (value, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), value


def make_train_step(prepare: Prepare, loss: Loss) -> Callable:
  """The jitted step; the state is donated (updated in place)."""
  return jax.jit(functools.partial(train_step, prepare=prepare, loss=loss), donate_argnums=0)


def fit(state: TrainState, step: Callable, batches, *, key, aux, epochs: int,
        steps_per_epoch: int, evaluate: Callable[[dict], float], evaluate_after: set,
        log: files.MetricsLog, log_name: str, desc: str, learning_rate: Callable | None = None,
        leave_bar: bool = True) -> tuple[TrainState, list]:
  """`epochs` epochs of `steps_per_epoch` steps over the `batches` iterator (dicts with `image`
  and `label`); step (epoch, i) uses fold_in(key, epoch · 100003 + i). After each epoch in
  `evaluate_after` (1-based) `evaluate(variables)` gives a test top-1; every epoch's mean loss is
  logged with the epoch's images/s and (given `learning_rate(step)`) learning rate. Returns the
  final state and [(epoch, top-1), ...]."""
  history = []
  limit = train_lib.DispatchLimit()
  bar = tqdm.trange(epochs, desc=desc, unit="epoch", leave=leave_bar)
  for epoch in bar:
    losses, images, started = [], 0, time.perf_counter()
    for i in range(steps_per_epoch):
      batch = next(batches)
      state, loss = step(state, batch["image"], batch["label"],
                         jax.random.fold_in(key, epoch * 100_003 + i), aux)
      losses.append(loss)
      limit(loss)
      images += len(batch["image"])
    values = {"train_loss": float(np.mean(jax.device_get(losses))),
              "images_per_second": images / (time.perf_counter() - started)}
    if learning_rate is not None:
      values["learning_rate"] = float(learning_rate(epoch * steps_per_epoch))
    if epoch + 1 in evaluate_after:
      values["test_accuracy"] = evaluate(state.variables)
      history.append((epoch + 1, values["test_accuracy"]))
    bar.set_postfix(loss=f"{values['train_loss']:.3f}",
                    **({"test_acc": f"{history[-1][1]:.2f}"} if history else {}))
    log.write(log_name, epoch + 1, **values)
  return state, history


def train(model, recipe, images, labels, test, *, seed: int, mean, std, prepare: Prepare,
          loss: Loss, aux, evaluate_after: set, log: files.MetricsLog, log_name: str, desc: str,
          pipeline: input_pipeline.PipelineConfig, leave_bar: bool = True
          ) -> tuple[TrainState, list]:
  """Trains `model` from scratch on `images`/`labels` by `recipe` (a config section with
  epochs, batch_size, optimizer, lr, momentum, weight_decay, warmup_epochs and optionally
  decay_bn_and_bias): the optimizer and its per-epoch schedule, the state (initialised from
  key(seed)), this process's batches, and `fit` with top-1 on `test`."""
  n = len(labels)
  batch_size = min(recipe.batch_size, n)
  key = jax.random.key(seed)
  steps = input_pipeline.steps_per_epoch(n, batch_size)
  schedule = train_lib.epoch_schedule(recipe.lr, recipe.epochs, steps, recipe.warmup_epochs)
  tx = train_lib.make_optimizer(recipe.optimizer, schedule, recipe.weight_decay, recipe.momentum,
                                decay_bn_and_bias=recipe.get("decay_bn_and_bias", True))
  accuracy = train_lib.make_accuracy_fn(model, mean, std, pipeline=pipeline)
  # Squeeze and relabel run on process 0 alone (see main.run_stages): it reads every batch.
  batches = input_pipeline.train_batches(images, labels, batch_size=batch_size, seed=seed,
                                         epochs=recipe.epochs, pipeline=pipeline,
                                         process_index=0, process_count=1)
  return fit(create_state(model, key, images.shape[1:], tx), make_train_step(prepare, loss),
             batches, key=key, aux=aux, epochs=recipe.epochs, steps_per_epoch=steps,
             evaluate=lambda v: accuracy(v, test.images, test.labels),
             evaluate_after=evaluate_after, learning_rate=schedule, log=log, log_name=log_name,
             desc=desc, leave_bar=leave_bar)


def eval_epochs(epochs: int, every: int, official: bool = False) -> set[int]:
  """The (1-based) epochs after which a model is evaluated: every `every` epochs and the last;
  `official` shifts them to the authors' `epoch % every == 0` on 0-based epochs (1, 1 + every,
  ..., and the last)."""
  offset = 1 if official else 0
  return {e for e in range(1, epochs + 1) if (e - offset) % every == 0 or e == epochs}

