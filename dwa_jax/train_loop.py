"""The one training loop of squeeze (teacher) and relabel (students): a pure `train_step`, a
`Trainer` that compiles it once for a mesh of every device, and `fit`, which runs the epochs,
evaluates, logs, and saves and resumes checkpoints. The two stages differ only in `prepare` (a
batch of images and labels -> the model's input and the loss's target) and `loss`.
"""

import functools
import time
from typing import Any, Callable

from flax.training import train_state
import jax
import numpy as np
import optax
from tqdm import auto as tqdm

from dwa_jax import data_parallel, files, input_pipeline, metrics_log, store, train_lib


class TrainCheckpoints:
  """Resume of one training run: every `every` epochs the train state, the PRNG key, the input
  pipeline's position and the evaluations so far, as the one step of `store`. Going on from it
  gives the same bits as a run that was never stopped (on the same devices)."""

  def __init__(self, store_: store.Store, every: int):
    self.store, self.every = store_, every

  def due(self, epoch: int, epochs: int) -> bool:
    """Whether to save after (1-based) `epoch`: every N epochs, not after the last."""
    return bool(self.every) and epoch % self.every == 0 and epoch < epochs

  def save(self, epoch: int, state, key, batches, history: list) -> None:
    self.store.save(epoch, {"train_state": state, "key": jax.random.key_data(key)},
                    {"history": history}, data=batches)

  def restore(self, state, batches):
    """(epoch, state, key, history) of the saved epoch, with `batches` moved to its position;
    None without one. `state` gives the structure and the shardings."""
    epoch = self.store.latest()
    if epoch is None:
      return None
    template = {"train_state": state, "key": jax.random.key_data(jax.random.key(0))}
    # A step that cannot be read is reported, never deleted (it may hold hours of training).
    with files.reading(self.store.steps / str(epoch), "resume checkpoint", self.store.hint):
      restored, meta = self.store.restore(epoch, template, batches)
      history = [tuple(h) for h in meta["history"]]
      key = jax.random.wrap_key_data(restored["key"])
    return epoch, restored["train_state"], key, history


class TrainState(train_state.TrainState):
  """Parameters, optimizer state and step, plus the BatchNorm running statistics."""
  batch_stats: Any = None

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}

  @property
  def evaluated_variables(self) -> dict:
    return self.variables


class EmaTrainState(TrainState):
  """A TrainState with the exponential moving average of the variables (`ema`), which is what is
  evaluated; a subclass, so that runs without an EMA have a checkpoint without the field."""
  ema: Any = None

  @property
  def evaluated_variables(self) -> dict:
    return self.ema


def create_state(model, key, image_shape, tx: optax.GradientTransformation,
                 ema: bool = False) -> TrainState:
  variables = model.init(key, np.zeros((1, *image_shape), np.float32))
  fields = dict(apply_fn=model.apply, params=variables["params"], tx=tx,
                batch_stats=variables["batch_stats"])
  if ema:
    return EmaTrainState.create(**fields, ema=jax.tree.map(np.copy, variables))
  return TrainState.create(**fields)


# prepare(key, images, labels, aux) -> (model input, loss target); loss(logits, target) -> scalar
Prepare = Callable[[Any, Any, Any, Any], tuple[Any, Any]]
Loss = Callable[[Any, Any], Any]


def train_step(state: TrainState, images, labels, key, aux, learning_rate=None, *,
               prepare: Prepare, loss: Loss, groups: int = 1, group_sharding=None,
               ema_decay: float = 0.0) -> tuple[TrainState, Any]:
  """One optimizer step on one (global) batch; `aux` carries what `prepare` needs besides the
  batch (the teachers' variables in relabel), `learning_rate` this step's rate (None: the one
  in the optimizer state). Dropout and stochastic depth draw from fold_in(key, 1), which leaves
  `prepare`'s stream as it was.

  With `groups` > 1 the batch is cut into that many equal groups (one per device, placed by
  `group_sharding`), each prepared with its own key and normalised with its own BatchNorm
  statistics, as DistributedDataParallel replicas are; the loss and the running statistics are
  the means over groups."""
  if learning_rate is not None:
    state = state.replace(opt_state=train_lib.with_learning_rate(state.opt_state, learning_rate))

  def forward(params, key, x, target):
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x,
                                     train=True, mutable=["batch_stats"],
                                     rngs={"dropout": jax.random.fold_in(key, 1)})
    return loss(logits, target), updates["batch_stats"]

  if groups == 1:
    x, target = prepare(key, images, labels, aux)
    loss_fn = lambda params: forward(params, key, x, target)
  else:
    def split(a):
      a = a.reshape(groups, -1, *a.shape[1:])
      return a if group_sharding is None else jax.lax.with_sharding_constraint(a, group_sharding)
    keys = jax.random.split(key, groups)
    x, target = jax.vmap(prepare, in_axes=(0, 0, 0, None))(
        keys, split(images), jax.tree.map(split, labels), aux)

    def loss_fn(params):
      values, stats = jax.vmap(forward, in_axes=(None, 0, 0, 0))(params, keys, x, target)
      return values.mean(), jax.tree.map(lambda s: s.mean(0), stats)

  (value, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if isinstance(state, EmaTrainState):
    # Over parameters and BN statistics alike, as timm's ModelEmaV2 (which EDC uses).
    state = state.replace(ema=jax.tree.map(lambda e, v: ema_decay * e + (1 - ema_decay) * v,
                                           state.ema, state.variables))
  return state, value


class Trainer:
  """Trains models of one architecture by one recipe (a config section: epochs, batch_size,
  optimizer, lr, momentum, weight_decay, warmup_epochs, optionally decay_bn_and_bias, lr_floor,
  ema_decay) on a mesh (`layout`), compiling once per input shape and dtype for every seed and
  image set."""

  def __init__(self, model, recipe, *, prepare: Prepare, loss: Loss, mean, std,
               layout: data_parallel.Layout, pipeline: input_pipeline.PipelineConfig):
    self.model, self.recipe, self.layout, self.pipeline = model, recipe, layout, pipeline
    self.tx = train_lib.make_optimizer(recipe.optimizer, recipe.weight_decay, recipe.momentum,
                                       recipe.get("decay_bn_and_bias", True))
    # The state is donated (updated in place) and stays replicated.
    self.ema_decay = float(recipe.get("ema_decay", 0.0))
    self._step = jax.jit(
        functools.partial(train_step, prepare=prepare, loss=loss, group_sharding=layout.sharded,
                          ema_decay=self.ema_decay),
        static_argnames="groups", donate_argnums=0,
        out_shardings=(layout.replicated, layout.replicated))
    self.accuracy = train_lib.make_accuracy_fn(model, mean, std, layout, pipeline=pipeline)

  def compilations(self) -> dict:
    """How many programs the step and the evaluation compiled to (one per input shape and dtype)."""
    return {"train_step": self._step._cache_size(),  # pylint: disable=protected-access
            "evaluation": self.accuracy.compilations()}

  def step(self, state: TrainState, batch: dict, key, aux, learning_rate):
    """One step on an input-pipeline batch (this process's part of it)."""
    size = int(batch["global_size"])
    images, labels = (self.layout.global_batch(batch[k], size) for k in ("image", "label"))
    return self._step(state, images, labels, key, aux, learning_rate,
                      groups=self.layout.groups(size))

  def train(self, images, labels, test, *, seed: int, aux, evaluate_after: set,
            log: metrics_log.MetricsLog, log_name: str, desc: str,
            checkpoints: TrainCheckpoints | None = None,
            leave_bar: bool = True) -> tuple[TrainState, list]:
    """Trains from scratch on `images`/`labels` (state from key(seed)), evaluating top-1 on
    `test` after the epochs in `evaluate_after`; resumes from `checkpoints` when they hold a
    saved epoch. Returns the final state and [(epoch, top-1), ...]."""
    rc = self.recipe
    n = len(labels)
    batch_size = min(rc.batch_size, n)
    key = self.layout.replicate(jax.random.key(seed))
    steps = input_pipeline.steps_per_epoch(n, batch_size)
    state = self.layout.replicate(
        create_state(self.model, jax.random.key(seed), images.shape[1:], self.tx,
                     ema=self.ema_decay > 0))
    batches = input_pipeline.train_batches(images, labels, batch_size=batch_size, seed=seed,
                                           epochs=rc.epochs, pipeline=self.pipeline,
                                           shard_multiple=self.layout.num_devices)
    aux = None if aux is None else self.layout.replicate(aux)
    return fit(self, state, batches, key=key, aux=aux, epochs=rc.epochs, steps_per_epoch=steps,
               learning_rate=train_lib.epoch_schedule(rc.lr, rc.epochs, steps, rc.warmup_epochs,
                                                      rc.get("lr_floor", 0.0)),
               evaluate=lambda v: self.accuracy(v, test.images, test.labels),
               evaluate_after=evaluate_after, log=log, log_name=log_name, desc=desc,
               checkpoints=checkpoints, leave_bar=leave_bar)


def time_steps(trainer: Trainer, images, labels, *, steps: int, aux=None, seed: int = 0,
               learning_rate: float = 0.01) -> dict:
  """Throughput of `trainer`'s step on `images`/`labels` (an array or a data.ImageSource, read
  through the trainer's input pipeline): one step that compiles, then `steps` timed steps.
  Returns steps and images per second, and the step's compilations so far."""
  batch_size = trainer.recipe.batch_size
  state = trainer.layout.replicate(create_state(trainer.model, jax.random.key(seed),
                                                images.shape[1:], trainer.tx))
  batches = input_pipeline.train_batches(images, labels, batch_size=batch_size, seed=seed,
                                         epochs=-(-batch_size * (steps + 1) // len(labels)),
                                         pipeline=trainer.pipeline,
                                         shard_multiple=trainer.layout.num_devices)
  key = jax.random.key(seed)
  aux = None if aux is None else trainer.layout.replicate(aux)
  state, loss = trainer.step(state, next(batches), key, aux, np.float32(learning_rate))
  jax.block_until_ready(loss)
  started = time.perf_counter()
  for i in range(steps):
    state, loss = trainer.step(state, next(batches), jax.random.fold_in(key, i + 1), aux,
                               np.float32(learning_rate))
  jax.block_until_ready(loss)
  seconds = time.perf_counter() - started
  return {"steps_per_second": round(steps / seconds, 3),
          "images_per_second": round(steps * batch_size / seconds, 1),
          "step_compilations": trainer.compilations()["train_step"]}


def fit(trainer: Trainer, state: TrainState, batches, *, key, aux, epochs: int,
        steps_per_epoch: int, learning_rate: Callable, evaluate: Callable[[dict], float],
        evaluate_after: set, log: metrics_log.MetricsLog, log_name: str, desc: str,
        checkpoints: TrainCheckpoints | None = None,
        leave_bar: bool = True) -> tuple[TrainState, list]:
  """`epochs` epochs of `steps_per_epoch` steps over the `batches` iterator; step (epoch, i)
  uses fold_in(key, epoch · 100003 + i) and the rate learning_rate(epoch · steps_per_epoch).
  After each epoch in `evaluate_after` (1-based) `evaluate(variables)` gives a test top-1;
  process 0 logs every epoch's mean loss, images/s and learning rate. With `checkpoints`, a
  saved run resumes after its last saved epoch. Returns the final state and [(epoch, top-1)]."""
  history, start = [], 0
  if checkpoints is not None:
    restored = checkpoints.restore(state, batches)
    if restored is not None:
      start, state, key, history = restored
      key = trainer.layout.replicate(key)
  lead = jax.process_index() == 0
  if start and lead:
    log.write(f"{log_name}/resume", start, resumed_after_epoch=start)
  limit = train_lib.DispatchLimit()
  bar = tqdm.trange(start, epochs, desc=desc, unit="epoch", leave=leave_bar, disable=not lead)
  for epoch in bar:
    losses, images, started = [], 0, time.perf_counter()
    rate = np.float32(learning_rate(epoch * steps_per_epoch))  # a host value: replicated
    for i in range(steps_per_epoch):
      batch = next(batches)
      state, loss = trainer.step(state, batch, jax.random.fold_in(key, epoch * 100_003 + i), aux,
                                 rate)
      losses.append(loss)
      limit(loss)
      images += int(batch["global_size"])
    values = {"train_loss": float(np.mean(jax.device_get(losses))),
              "images_per_second": images / (time.perf_counter() - started),
              "learning_rate": float(rate)}
    if epoch + 1 in evaluate_after:
      values["test_accuracy"] = evaluate(state.evaluated_variables)
      history.append((epoch + 1, values["test_accuracy"]))
    # Three significant digits: a KL at a high temperature without T² is around 1e-4.
    bar.set_postfix(loss=f"{values['train_loss']:.3g}",
                    **({"test_acc": f"{history[-1][1]:.2f}"} if history else {}))
    if lead:
      log.write(log_name, epoch + 1, **values)
    if checkpoints is not None and checkpoints.due(epoch + 1, epochs):
      checkpoints.save(epoch + 1, state, key, batches, history)
  return state, history


def eval_epochs(epochs: int, every: int, official: bool = False) -> set[int]:
  """The (1-based) epochs after which a model is evaluated: every `every` epochs and the last;
  `official` shifts them to the authors' `epoch % every == 0` on 0-based epochs (1, 1 + every,
  ..., and the last)."""
  offset = 1 if official else 0
  return {e for e in range(1, epochs + 1) if (e - offset) % every == 0 or e == epochs}

