"""Pieces shared by the squeeze (teacher) and relabel (student) training loops."""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from dwa_jax import augment, data_parallel, input_pipeline


def epoch_schedule(base_lr: float, epochs: int, steps_per_epoch: int,
                   warmup_epochs: int = 0, floor: float = 0.0) -> Callable:
  """Stepped once per epoch (torch schedulers called per epoch): `warmup_cosine`."""
  def schedule(step):
    return warmup_cosine(base_lr, epochs, warmup_epochs, step // steps_per_epoch, floor)
  return schedule


@functools.lru_cache(maxsize=None)
def make_optimizer(name: str, weight_decay: float, momentum: float = 0.9,
                   decay_bn_and_bias: bool = True) -> optax.GradientTransformation:
  """torch-equivalent SGD (coupled L2, heavy-ball momentum) or AdamW (decoupled, lr-scaled).

  The learning rate lives in the optimizer state (`optax.inject_hyperparams`), set by each step
  from the host's schedule, so the compiled step does not depend on the schedule. Cached: one
  transformation per recipe keeps the compiled step the same for every seed and set."""
  # True where weight decay applies; the ImageNet recipe exempts BN parameters and biases.
  mask = lambda params: jax.tree.map(lambda p: bool(decay_bn_and_bias) or p.ndim > 1, params)
  if name == "sgd":
    def sgd(learning_rate):
      return optax.chain(optax.masked(optax.add_decayed_weights(weight_decay), mask),
                         optax.sgd(learning_rate, momentum=momentum))
    return optax.inject_hyperparams(sgd)(learning_rate=0.0)
  if name == "adamw":
    def adamw(learning_rate):
      return optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay,
                         mask=mask)
    return optax.inject_hyperparams(adamw)(learning_rate=0.0)
  raise ValueError(f"Unknown optimizer {name!r}; use 'sgd' or 'adamw'.")


def with_learning_rate(opt_state, learning_rate):
  """The state of a `make_optimizer` transformation with its learning rate replaced."""
  hyperparams = dict(opt_state.hyperparams)
  hyperparams["learning_rate"] = jnp.asarray(learning_rate, hyperparams["learning_rate"].dtype)
  return opt_state._replace(hyperparams=hyperparams)


def normalize(images, mean, std):
  """uint8 or [0, 1] float images -> normalised float32."""
  x = jnp.asarray(images)
  x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def augment_views(key, x, kind: str):
  """Per-example training augmentation of normalised NHWC images."""
  if kind == "none":
    return x
  crop_key, flip_key = jax.random.split(key)
  if kind == "crop_flip":
    x = augment.random_crop_with_padding(crop_key, x, pad=max(1, x.shape[1] // 8))
  elif kind == "rrc_flip":
    x = augment.random_resized_crop(crop_key, x, x.shape[1], per_example=True)
  else:
    raise ValueError(f"Unknown augmentation {kind!r}; use 'crop_flip', 'rrc_flip' or 'none'.")
  return augment.random_flip(flip_key, x, per_example=True)


class DispatchLimit:
  """Lets at most `depth` jitted steps be queued: JAX dispatches asynchronously, and every queued
  step holds its input batch, so an unbounded loop over a large set holds many batches at once."""

  def __init__(self, depth: int = 2):
    self.depth, self.queued = depth, []

  def __call__(self, output) -> None:
    self.queued.append(output)
    if len(self.queued) >= self.depth:
      jax.block_until_ready(self.queued.pop(0))


def make_accuracy_fn(model, mean, std, layout: data_parallel.Layout, batch_size: int = 512,
                     pipeline: input_pipeline.PipelineConfig = input_pipeline.PipelineConfig()
                     ) -> Callable:
  """`(variables, images, labels) -> top-1 %` in eval mode over the whole set. Every process
  reads its shard through the input pipeline, in fixed-size batches sharded over all devices
  (one compile per model); the count of correct rows is summed over the mesh."""

  @functools.partial(jax.jit, out_shardings=layout.replicated)
  def correct(variables, x, y, mask):
    logits = model.apply(variables, normalize(x, mean, std), train=False)
    return jnp.sum((jnp.argmax(logits, -1) == y) & mask)

  def accuracy(variables, images, labels) -> float:
    per_process = -(-batch_size // jax.process_count())
    batches = input_pipeline.eval_batches(images, labels, batch_size=per_process,
                                          pipeline=pipeline, multiple=layout.local_devices)
    variables = layout.replicate(variables)
    total = sum(int(correct(variables, *(layout.global_eval_batch(b[k])
                                         for k in ("image", "label", "mask"))))
                for b in batches)
    return 100.0 * total / len(labels)

  accuracy.compilations = correct._cache_size  # pylint: disable=protected-access
  return accuracy


def warmup_cosine(base_lr: float, epochs: int, warmup_epochs: int, epoch, floor: float = 0.0):
  """The per-epoch learning rate: linear from 0.01·lr over `warmup_epochs` (torch LinearLR with
  start_factor 0.01, the authors' Tiny-ImageNet recipe), then cosine over the remaining epochs,
  from lr down to floor·lr (floor 0: to zero, the official recipes; RDED's decays to half)."""
  epoch = jnp.asarray(epoch, jnp.float32)
  decay_epochs = max(epochs - warmup_epochs, 1)
  cosine = 0.5 * base_lr * (1 + jnp.cos(jnp.pi * (epoch - warmup_epochs) / decay_epochs))
  if floor:
    cosine = floor * base_lr + (1 - floor) * cosine
  if warmup_epochs == 0:
    return cosine
  warm = base_lr * (0.01 + 0.99 * epoch / warmup_epochs)
  return jnp.where(epoch < warmup_epochs, warm, cosine)
