"""Pieces shared by the squeeze (teacher) and relabel (student) training loops."""

import math
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dwa_jax import augment


def epoch_schedule(base_lr: float, epochs: int, steps_per_epoch: int,
                   warmup_epochs: int = 0) -> Callable:
  """Cosine annealing stepped once per epoch (torch CosineAnnealingLR(T_max=epochs) called per
  epoch), after `warmup_epochs` of linear warm-up lr·(e+1)/warmup."""
  def schedule(step):
    epoch = (step // steps_per_epoch).astype(jnp.float32)
    decay_epochs = max(epochs - warmup_epochs, 1)
    cosine = 0.5 * base_lr * (1 + jnp.cos(jnp.pi * (epoch - warmup_epochs) / decay_epochs))
    if warmup_epochs == 0:
      return cosine
    return jnp.where(epoch < warmup_epochs, base_lr * (epoch + 1) / warmup_epochs, cosine)
  return schedule


def _decay_mask(params, decay_bn_and_bias: bool):
  """True where weight decay applies; the ImageNet recipe exempts BN parameters and biases."""
  if decay_bn_and_bias:
    return jax.tree.map(lambda _: True, params)
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(name: str, schedule: Callable, weight_decay: float, momentum: float = 0.9,
                   decay_bn_and_bias: bool = True) -> optax.GradientTransformation:
  """torch-equivalent SGD (coupled L2, heavy-ball momentum) or AdamW (decoupled, lr-scaled)."""
  mask = lambda p: _decay_mask(p, decay_bn_and_bias)
  if name == "sgd":
    return optax.chain(optax.masked(optax.add_decayed_weights(weight_decay), mask),
                       optax.sgd(schedule, momentum=momentum))
  if name == "adamw":
    return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, mask=mask)
  raise ValueError(f"Unknown optimizer {name!r}; use 'sgd' or 'adamw'.")


def epoch_batches(rng: np.random.Generator, n: int, batch_size: int) -> list[np.ndarray]:
  """A shuffled epoch in batches, the last one partial (torch DataLoader, drop_last=False)."""
  order = rng.permutation(n)
  return [order[i:i + batch_size] for i in range(0, n, batch_size)]


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


def eval_batches(images: np.ndarray, labels: np.ndarray,
                 batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
  """Fixed-size batches (the last padded by repetition) so evaluation compiles once."""
  n = len(labels)
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size) % n
    yield images[idx], labels[idx], min(batch_size, n - start)


def make_accuracy_fn(model, mean, std, batch_size: int = 500) -> Callable:
  """`(variables, images, labels) -> top-1 %` in eval mode; compiled once per model."""

  @jax.jit
  def correct(variables, x, y, valid):
    logits = model.apply(variables, normalize(x, mean, std), train=False)
    hits = jnp.argmax(logits, -1) == y
    return jnp.sum(hits * (jnp.arange(y.shape[0]) < valid))

  def accuracy(variables, images: np.ndarray, labels: np.ndarray) -> float:
    size = min(batch_size, len(labels))
    total = sum(int(correct(variables, x, y, valid))
                for x, y, valid in eval_batches(images, labels, size))
    return 100.0 * total / len(labels)

  return accuracy


def steps_per_epoch(n: int, batch_size: int) -> int:
  return math.ceil(n / batch_size)
