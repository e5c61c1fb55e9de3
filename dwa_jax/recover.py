"""Recover: synthesise images against a frozen BatchNorm teacher (SRe2L, and DWA's directed Δθ).

One synthetic batch holds one image per class. For each batch (see ../shared/SPEC.md):
  1. DWA only: Δθ from K normalised gradient-ascent steps of CE on the batch's own initial real
     images (first augmented view), ‖Δθ‖ ≤ ρ; fixed for the whole batch.
  2. T Adam steps on the pixels of
       CE(f_{θ+Δθ}(x_aug), y) + r_bn Σ_l w_l (r_var ‖σ²_l − var_l‖₂ + ‖μ_l − mean_l‖₂),
     μ_l, σ²_l the batch statistics of BN layer l's INPUT (teacher in eval mode), clamped to the
     valid pixel range after every step.
Everything here is a pure function of (teacher variables, initial images, jitter offsets, key):
gradients are taken w.r.t. the pixels only, so XLA never computes teacher weight gradients.
"""

import contextlib
import dataclasses
import functools
import hashlib
import pathlib
import shutil
import time
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import auto as tqdm

from dwa_jax import augment as augment_lib
from dwa_jax import compat, data, files, input_pipeline, squeeze
from dwa_jax.models.layers import BN_STATS, BatchNorm

METHODS = ("dwa", "sre2l", "random")


@dataclasses.dataclass(frozen=True)
class SynthesisConfig:
  """Hyper-parameters of one synthetic batch; defaults are the official CIFAR DWA settings."""
  method: str = "dwa"              # 'dwa', 'sre2l' (no Δθ), 'random' (Gaussian Δθ ablation)
  iterations: int = 1000           # T
  lr: float = 0.25
  r_bn: float = 0.01               # λ_mean
  r_var: float = 11.0              # λ_var = r_bn · r_var
  first_bn_weight: float = 10.0
  adjust_steps: int = 12           # K
  rho: float = 0.015
  jitter: int = 4                  # roll offsets drawn from {0, ..., jitter}
  augment: str = "roll"            # 'roll' (CIFAR) or 'crop_flip_roll' (Tiny-ImageNet/ImageNet)
  adam_b1: float = 0.5
  adam_b2: float = 0.9
  adam_eps: float = 1e-8
  # Reproduce the official code's quirk Q1: the K ascent passes' ∂CE/∂x leak into step 0.
  compat_q1: bool = False
  # Reproduce quirk Q2 (official ImageNet code): the class-chunks of one ipc index form a chain;
  # Δθ accumulates along it and the previous chunk's weight gradients leak into the first
  # ascent step (see `ChainCarry`). DWA only.
  compat_q2: bool = False

  @property
  def chained(self) -> bool:
    """Whether quirk Q2 acts: it chains DWA's weight adjustment, which the others do not have."""
    return self.compat_q2 and self.method == "dwa"

  def __post_init__(self):
    errors = []
    if self.method not in METHODS:
      errors.append(f"method must be one of {METHODS}, got {self.method!r}")
    if self.augment not in ("roll", "crop_flip_roll"):
      errors.append(f"augment must be 'roll' or 'crop_flip_roll', got {self.augment!r}")
    if self.iterations < 1:
      errors.append(f"iterations must be >= 1, got {self.iterations}")
    if self.method == "dwa" and self.adjust_steps < 1:
      errors.append(f"adjust_steps (K) must be >= 1 for DWA, got {self.adjust_steps}")
    for name in ("lr", "r_bn", "r_var", "first_bn_weight", "rho", "jitter"):
      if getattr(self, name) < 0:
        errors.append(f"{name} must be >= 0, got {getattr(self, name)}")
    if errors:
      raise ValueError("Invalid synthesis config: " + "; ".join(errors))


def sre2l_config(**overrides) -> SynthesisConfig:
  """SRe2L: no weight adjustment and r_var = 1 (its initialisation is Gaussian noise)."""
  return SynthesisConfig(**{"method": "sre2l", "r_var": 1.0, **overrides})


# ----------------------------------------------------------------------------- teacher forward

def bn_layer_paths(model: nn.Module, variables: Any, image_shape: Sequence[int]) -> tuple:
  """Module paths of the BatchNorm layers in the order the forward pass calls them."""
  order = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, BatchNorm) and context.method_name == "__call__":
      order.append(context.module.path)
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
  if not order:
    raise ValueError(f"{type(model).__name__} has no BatchNorm layer: SRe2L/DWA need a BN teacher.")
  return tuple(order)


def _at(tree, path):
  for name in path:
    tree = tree[name]
  return tree


def forward_with_bn_stats(model, params, batch_stats, x, bn_paths):
  """Eval-mode logits plus the (mean, biased var) of each BN layer's input, in call order."""
  logits, state = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False,
                              capture_stats=True, mutable=[BN_STATS])
  stats = [_at(state[BN_STATS], p)["mean_var"][0] for p in bn_paths]
  return logits, stats


def bn_matching_terms(stats, batch_stats, bn_paths, r_var):
  """Per layer: r_var·‖σ²_l − running_var_l‖₂ + ‖μ_l − running_mean_l‖₂ (plain, unsquared L2)."""
  terms = []
  for (mean, var), path in zip(stats, bn_paths):
    running = _at(batch_stats, path)
    terms.append(r_var * jnp.linalg.norm(var - running["var"])
                 + jnp.linalg.norm(mean - running["mean"]))
  return jnp.stack(terms)


def bn_layer_weights(num_layers: int, first_bn_weight: float):
  return jnp.array([first_bn_weight] + [1.0] * (num_layers - 1))


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# ----------------------------------------------------------------------------- augmentation

def draw_jitter_offsets(key, iterations: int, jitter: int):
  """(T, 2) roll offsets, each uniform on {0, ..., jitter} (the official code never rolls back)."""
  return jax.random.randint(key, (iterations, 2), 0, jitter + 1)


class AugmentDraws(NamedTuple):
  """Every random draw of one batch's augmentation, one row per iteration, made up front: a
  synthesis is a pure function of them, so a recording of the authors' draws can be replayed."""
  roll: Any          # (T, 2) int: circular shift along (height, width), each in 0..jitter
  crop: Any = None   # (T, 4) int: (top, left, height, width) of RandomResizedCrop (crop_flip_roll)
  flip: Any = None   # (T,) bool: horizontal flip, applied after the resize (crop_flip_roll)

  def at(self, t) -> "AugmentDraws":
    return jax.tree.map(lambda a: a[t], self)


def as_draws(draws) -> AugmentDraws:
  """AugmentDraws, or a bare (T, 2) array of roll offsets (the CIFAR augmentation)."""
  return draws if isinstance(draws, AugmentDraws) else AugmentDraws(jnp.asarray(draws))


def draw_augmentation(key, iterations: int, cfg: "SynthesisConfig", image_hw) -> AugmentDraws:
  """The draws of one batch: roll offsets, and for 'crop_flip_roll' one RandomResizedCrop box
  (torchvision's rule, `augment.sample_crop_box`) and one flip decision per iteration."""
  roll_key, crop_key = jax.random.split(key)
  roll = draw_jitter_offsets(roll_key, iterations, cfg.jitter)
  if cfg.augment == "roll":
    return AugmentDraws(roll)
  box_keys, flip_keys = jax.random.split(crop_key, (2, iterations))
  boxes = jax.vmap(lambda k: jnp.stack(augment_lib.sample_crop_box(k, *image_hw)))(box_keys)
  flips = jax.vmap(lambda k: jax.random.bernoulli(k, 0.5))(flip_keys)
  return AugmentDraws(roll, boxes.astype(jnp.int32), flips)


def synthesis_view(x, draw: AugmentDraws, augment: str):
  """The augmented copy the teacher sees at one iteration, one transform for the whole batch
  (the official code transforms the batch tensor): for 'crop_flip_roll', crop the box and
  resize it back to full size (bilinear), flip, then roll; for 'roll', roll only."""
  draw = as_draws(draw)
  if augment == "crop_flip_roll":
    if draw.crop is None or draw.flip is None:
      raise ValueError("augment='crop_flip_roll' needs crop boxes and flips in the draws.")
    x = augment_lib.crop_and_resize(x, draw.crop, x.shape[1])
    x = jnp.where(draw.flip, x[:, :, ::-1, :], x)
  return jnp.roll(x, (draw.roll[0], draw.roll[1]), axis=(1, 2))


def pixel_bounds(mean, std, dtype):
  """Normalised values of pixel 0 and 1 per channel: the clamp box."""
  mean, std = jnp.asarray(mean, dtype), jnp.asarray(std, dtype)
  return -mean / std, (1 - mean) / std


def cosine_lr(step, iterations: int, lr: float, dtype):
  """lr_t = ½(1 + cos(π t / T))·lr, no warm-up (the official per-iteration schedule)."""
  t = jnp.asarray(step, dtype)
  return 0.5 * (1 + jnp.cos(jnp.pi * t / iterations)) * lr


# ----------------------------------------------------------------------------- weight adjustment

def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


def _stack(per_step: list) -> dict:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *per_step)


class ChainCarry(NamedTuple):
  """What one class-chunk hands the next under quirk Q2 (the official ImageNet loop never
  restores θ and never clears the weight gradients between the chunks of an ipc index)."""
  delta: Any         # Δθ accumulated so far: the next chunk's ascent starts from θ0 + delta
  weight_grad: Any   # Σ_t ∇θ L_total over this chunk's iterations: leaks into the next ascent


def empty_chain(params) -> ChainCarry:
  """The carry into the first chunk of an ipc index (the teacher as loaded)."""
  zeros = jax.tree.map(jnp.zeros_like, params)
  return ChainCarry(zeros, zeros)


def directed_weight_adjustment(model, params, batch_stats, x, view, labels, bn_paths,
                               cfg: SynthesisConfig, chain: ChainCarry | None = None):
  """K steps Δθ += (ρ/K)·g/(‖g‖+1e-12), g = ∇_θ CE(f_{θ+Δθ}(view(x))), one global norm over θ.

  All parameters move (BN affine included); running statistics do not. With a `chain` (quirk
  Q2) Δθ starts from chain.delta and the first step's g also holds chain.weight_grad. Returns
  Δθ, the image gradient the official code accumulates during the ascent (for compat_q1; zeros
  otherwise) and per-pass metrics (CE before each update, BN terms).
  """

  def ce_and_terms(delta, x):
    logits, stats = forward_with_bn_stats(model, _add(params, delta), batch_stats, view(x), bn_paths)
    return cross_entropy(logits, labels), bn_matching_terms(stats, batch_stats, bn_paths, cfg.r_var)

  grad_fn = jax.value_and_grad(ce_and_terms, argnums=(0, 1) if cfg.compat_q1 else 0, has_aux=True)

  def ascent_step(carry, leaked):
    delta, x_grad_sum = carry
    (ce, terms), grads = grad_fn(delta, x)
    if cfg.compat_q1:
      g, x_grad = grads
      x_grad_sum = x_grad_sum + x_grad
    else:
      g = grads
    if leaked is not None:
      g = _add(leaked, g)
    scale = (cfg.rho / cfg.adjust_steps) / (optax.tree.norm(g) + 1e-12)
    delta = jax.tree.map(lambda d, gi: d + scale * gi, delta, g)
    return (delta, x_grad_sum), {"ce": ce, "bn_terms": terms}

  # Unrolled: XLA's CPU backend runs convolutions inside while loops several times slower.
  start = jax.tree.map(jnp.zeros_like, params) if chain is None else chain.delta
  carry = (start, jnp.zeros_like(x))
  per_step = []
  for k in range(cfg.adjust_steps):
    carry, m = ascent_step(carry, chain.weight_grad if chain is not None and k == 0 else None)
    per_step.append(m)
  (delta, x_grad_sum) = carry
  return delta, x_grad_sum, _stack(per_step)


def random_weight_adjustment(key, params, rho):
  """Ablation (paper Table 3): a Gaussian direction with the same global norm ρ."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  noise = [jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)]
  noise = jax.tree.unflatten(treedef, noise)
  return jax.tree.map(lambda n: n * (rho / optax.tree.norm(noise)), noise)


# ----------------------------------------------------------------------------- one batch

def synthesis_loss(model, params, batch_stats, x_view, labels, bn_paths, layer_weights,
                   cfg: SynthesisConfig):
  """CE + r_bn·Σ_l w_l·term_l on an augmented view; returns (loss, (ce, per-layer terms))."""
  logits, stats = forward_with_bn_stats(model, params, batch_stats, x_view, bn_paths)
  ce = cross_entropy(logits, labels)
  terms = bn_matching_terms(stats, batch_stats, bn_paths, cfg.r_var)
  return ce + cfg.r_bn * jnp.dot(layer_weights, terms), (ce, terms)


class BatchState(NamedTuple):
  """A synthetic batch between iterations: enough to continue (or checkpoint) it."""
  x: jax.Array                 # current normalised pixels
  adam: Any                    # optax.ScaleByAdamState
  delta: Any                   # Δθ (None for SRe2L)
  first_grad_extra: jax.Array  # quirk Q1's leaked ascent gradient (zeros unless compat_q1)
  t: jax.Array                 # index of the next iteration
  weight_grad_sum: Any = None  # quirk Q2: Σ ∇θ L_total over the iterations so far (else None)

  def chain(self) -> ChainCarry:
    """The carry into the next class-chunk of this ipc index (compat_q2)."""
    return ChainCarry(self.delta, self.weight_grad_sum)


def _adam(cfg: SynthesisConfig):
  return optax.scale_by_adam(b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps)


def start_batch(model, variables, x_init, labels, key, draws, *, bn_paths,
                cfg: SynthesisConfig, chain: ChainCarry | None = None):
  """Weight adjustment (DWA: directed, 'random': Gaussian, SRe2L: none) and fresh Adam state.

  `draws`: the batch's `AugmentDraws` (or (T, 2) roll offsets); the ascent sees iteration 0's
  view. `chain` (compat_q2, DWA): the previous chunk's carry (`empty_chain` for the first).
  Returns the BatchState at t = 0 and metrics: `delta_norm` (of the Δθ in use), for DWA per
  ascent pass `adjust_ce` and `adjust_bn_terms`, and with a chain `delta_norm_chunk` (the
  norm of this chunk's own ascent).
  """
  params, batch_stats = variables["params"], variables["batch_stats"]
  draws = as_draws(draws)
  metrics = {}
  extra = jnp.zeros_like(x_init)
  delta = None
  if cfg.chained and chain is None:
    chain = empty_chain(params)
  if cfg.method == "dwa":
    view0 = lambda x: synthesis_view(x, draws.at(0), cfg.augment)
    delta, extra, adjust = directed_weight_adjustment(model, params, batch_stats, x_init, view0,
                                                      labels, bn_paths, cfg, chain)
    metrics = {"adjust_ce": adjust["ce"], "adjust_bn_terms": adjust["bn_terms"]}
    if cfg.chained:
      metrics["delta_norm_chunk"] = optax.tree.norm(jax.tree.map(jnp.subtract, delta, chain.delta))
  elif cfg.method == "random":
    delta = random_weight_adjustment(jax.random.split(key, cfg.iterations + 1)[-1], params,
                                     cfg.rho)
  metrics["delta_norm"] = (jnp.zeros((), x_init.dtype) if delta is None
                           else optax.tree.norm(delta))
  weight_grad_sum = jax.tree.map(jnp.zeros_like, params) if cfg.chained else None
  state = BatchState(x_init, _adam(cfg).init(x_init), delta, extra, jnp.zeros((), jnp.int32),
                     weight_grad_sum)
  return state, metrics


def run_iterations(model, variables, state: BatchState, labels, key, draws, num_steps: int, *,
                   bn_paths, pixel_mean, pixel_std, cfg: SynthesisConfig, unroll: bool = False):
  """Iterations state.t .. state.t + num_steps − 1 of Adam on the pixels (clamped after each).

  Running T iterations in one call or in several chunks computes the same thing, which is what
  lets the recover stage checkpoint inside a batch. `unroll=True` traces num_steps copies instead
  of a `lax.scan` (XLA's CPU backend runs convolutions inside loops ~3x slower); use it for short
  blocks, see `make_synthesizer`. Metrics per iteration: `ce`, `bn_terms` (num_steps, L),
  `grad_norm` (of the gradient Adam received), `lr`. Only under compat_q2 are teacher weight
  gradients computed (and summed into state.weight_grad_sum), as the official loop does.
  """
  del key  # the draws hold all the randomness of the iterations
  params, batch_stats = variables["params"], variables["batch_stats"]
  draws = as_draws(draws)
  dtype = state.x.dtype
  layer_w = bn_layer_weights(len(bn_paths), cfg.first_bn_weight).astype(dtype)
  lo, hi = pixel_bounds(pixel_mean, pixel_std, dtype)
  adam = _adam(cfg)
  track_weights = state.weight_grad_sum is not None

  def loss_fn(x, delta, t):
    model_params = params if delta is None else _add(params, delta)
    return synthesis_loss(model, model_params, batch_stats,
                          synthesis_view(x, draws.at(t), cfg.augment), labels, bn_paths, layer_w,
                          cfg)

  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1) if track_weights else 0, has_aux=True)

  def step(carry, t):
    x, adam_state, weight_grad_sum = carry
    (_, (ce, terms)), grads = grad_fn(x, state.delta, t)
    if track_weights:
      grad, weight_grad = grads
      weight_grad_sum = _add(weight_grad_sum, weight_grad)
    else:
      grad = grads
    grad = grad + jnp.where(t == 0, state.first_grad_extra, jnp.zeros_like(grad))
    lr = cosine_lr(t, cfg.iterations, cfg.lr, dtype)
    direction, adam_state = adam.update(grad, adam_state)
    x = jnp.clip(x - lr * direction, lo, hi)
    return (x, adam_state, weight_grad_sum), {"ce": ce, "bn_terms": terms,
                                              "grad_norm": jnp.linalg.norm(grad), "lr": lr}

  steps = state.t + jnp.arange(num_steps, dtype=jnp.int32)
  carry = (state.x, state.adam, state.weight_grad_sum)
  if unroll:
    per_step = []
    for i in range(num_steps):
      carry, m = step(carry, steps[i])
      per_step.append(m)
    metrics = _stack(per_step)
  else:
    carry, metrics = jax.lax.scan(step, carry, steps)
  x, adam_state, weight_grad_sum = carry
  return state._replace(x=x, adam=adam_state, t=state.t + num_steps,
                        weight_grad_sum=weight_grad_sum), metrics


def synthesize_batch(model, variables, x_init, labels, key, draws, *, bn_paths, pixel_mean,
                     pixel_std, cfg: SynthesisConfig, chain: ChainCarry | None = None):
  """Optimises one synthetic batch from start to end. Pure and jit-able (model, bn_paths, cfg
  static).

  Args:
    variables: the frozen teacher's {'params', 'batch_stats'}.
    x_init: (N, H, W, C) normalised initial images (real images for DWA, noise for SRe2L).
    labels: (N,) int labels.
    key: randomness of the random-Δθ ablation.
    draws: the augmentation draws (`draw_augmentation`), or (T, 2) roll offsets.
    chain: compat_q2 only: the previous class-chunk's carry.
  Returns:
    the final normalised images and a metrics dict: per iteration `ce`, `bn_terms` (T, L),
    `grad_norm`, `lr`; per ascent pass `adjust_ce`, `adjust_bn_terms`; and `delta_norm`.
  """
  state, start_metrics = start_batch(model, variables, x_init, labels, key, draws,
                                     bn_paths=bn_paths, cfg=cfg, chain=chain)
  state, metrics = run_iterations(model, variables, state, labels, key, draws, cfg.iterations,
                                  bn_paths=bn_paths, pixel_mean=pixel_mean, pixel_std=pixel_std,
                                  cfg=cfg)
  return state.x, {**metrics, **start_metrics}


ITERATION_BLOCK = 4  # iterations per compiled program: fast on CPU, compiles in seconds


def iteration_blocks(num_steps: int, block: int = ITERATION_BLOCK) -> list[int]:
  """num_steps split into blocks of `block` (the last one shorter)."""
  return [min(block, num_steps - s) for s in range(0, num_steps, block)]


def make_synthesizer(model, variables, image_shape, pixel_mean, pixel_std, cfg: SynthesisConfig,
                     block: int = ITERATION_BLOCK) -> Callable:
  """`(variables, x_init, labels, key, draws, chain=None) -> (images, metrics)` for this teacher.

  The same computation as `synthesize_batch`, run as a jitted weight adjustment followed by
  jitted blocks of `block` unrolled iterations. Under compat_q2, metrics['chain'] is the
  `ChainCarry` to pass to the next class-chunk of the same ipc index.
  """
  bn_paths = bn_layer_paths(model, variables, image_shape)
  start = jax.jit(functools.partial(start_batch, model, bn_paths=bn_paths, cfg=cfg))
  advance = functools.lru_cache()(lambda n: jax.jit(
      functools.partial(run_iterations, model, num_steps=n, bn_paths=bn_paths,
                        pixel_mean=pixel_mean, pixel_std=pixel_std, cfg=cfg, unroll=True)))

  def synthesize(variables, x_init, labels, key, draws, chain=None):
    draws = as_draws(draws)
    state, start_metrics = start(variables, x_init, labels, key, draws, chain=chain)
    per_block = []
    for n in iteration_blocks(cfg.iterations, block):
      state, m = advance(n)(variables, state, labels, key, draws)
      per_block.append(m)
    metrics = jax.tree.map(lambda *xs: jnp.concatenate(xs), *per_block)
    if cfg.chained:
      metrics["chain"] = state.chain()
    return state.x, {**metrics, **start_metrics}

  return synthesize


def delta_theta(model, variables, x, labels, offset, *, image_shape, cfg: SynthesisConfig):
  """The DWA adjustment alone, on roll `offset` of `x`, for inspection and tests.

  Returns (Δθ, the ascent's accumulated image gradient (zeros unless cfg.compat_q1), metrics).
  """
  bn_paths = bn_layer_paths(model, variables, image_shape)
  view = lambda x: synthesis_view(x, AugmentDraws(offset), "roll")
  return directed_weight_adjustment(
      model, variables["params"], variables["batch_stats"], x, view, labels, bn_paths, cfg)


# ============================================================================= the recover stage
# Batches (ipc index i, class chunk j) are independent and keyed by (seed, i, j): whichever
# process or device runs one, it gives the same bytes. Each process owns ipc indices
# i ≡ process_index (mod process_count); within a process, groups of one batch per local device
# run concurrently (see GroupRunner). Progress lives in <workdir>/progress/<method>/:
# every finished batch as an .npz, and the in-flight group's pixels + Adam state as an Orbax
# checkpoint every `checkpoint_every` iterations, so a killed run resumes bit-identically.

def synthesis_config(rc, method: str) -> SynthesisConfig:
  """ml_collections `config.recover` -> the engine's config for `method` (SRe2L: r_var = 1)."""
  return SynthesisConfig(
      method=method, iterations=rc.iterations, lr=rc.lr, r_bn=rc.r_bn,
      r_var=rc.sre2l_r_var if method == "sre2l" else rc.r_var,
      first_bn_weight=rc.first_bn_weight, adjust_steps=rc.adjust_steps, rho=rc.rho,
      jitter=rc.jitter, augment=rc.augment, compat_q1=bool(rc.compat_q1),
      compat_q2=bool(rc.compat_q2) and method == "dwa")


def engine_config(cfg: SynthesisConfig, num_chunks: int) -> SynthesisConfig:
  """What runs: Q2 acts only between the class-chunks of an ipc index, so with one chunk it
  changes no value, and tracking the teacher's weight gradients would only cost time."""
  return dataclasses.replace(cfg, compat_q2=False) if num_chunks == 1 else cfg


def init_kind(rc, method: str) -> str:
  """'real' (DWA and the random ablation) or 'noise' (SRe2L), unless the config forces one."""
  if rc.init in ("real", "noise"):
    return rc.init
  return "noise" if method == "sre2l" else "real"


def initial_rows(dataset, ipc: int, seed: int, kind: str) -> np.ndarray | None:
  """'real': the (ipc, num_classes) training-image indices the batches start from,
  `data.sample_per_class(dataset, ipc, seed)` (labels only: nothing is decoded); 'noise': None."""
  return data.sample_per_class(dataset, ipc, seed) if kind == "real" else None


def initial_batch(dataset, rows, ipc_index: int, classes, seed: int, mean, std,
                  dtype=np.float32) -> np.ndarray:
  """(len(classes), H, W, C) normalised starting images of batch (ipc_index, classes) in
  `dtype`, read when the batch starts so no stage holds the whole starting set.

  Real (`rows` from `initial_rows`): those training images, read through the data set and
  normalised as torchvision's ToTensor + Normalize do it: (u8 / 255 − mean) / std in `dtype`.
  Noise (`rows` None, SRe2L): N(0, 1) in normalised space, one draw per (ipc index, class) from
  jax.random.key(seed), so a batch's noise does not depend on which others exist.
  """
  classes = np.asarray(classes)
  if rows is not None:
    mean, std = np.asarray(mean, dtype), np.asarray(std, dtype)
    pixels = input_pipeline.read(dataset.images, rows[ipc_index, classes])
    return (np.asarray(pixels).astype(dtype) / 255 - mean) / std
  key = jax.random.fold_in(jax.random.key(seed), ipc_index)
  draw = jax.vmap(lambda c: jax.random.normal(jax.random.fold_in(key, c),
                                              dataset.images.shape[1:], jnp.float32))
  return np.asarray(draw(jnp.asarray(classes))).astype(dtype)


def initial_batches(dataset, ipc: int, seed: int, kind: str, mean, std,
                    dtype=np.float32) -> np.ndarray:
  """Every batch's starting images, (ipc, num_classes, H, W, C): for tests and small sets only
  (the stage reads them per batch with `initial_batch`)."""
  rows = initial_rows(dataset, ipc, seed, kind)
  every = np.arange(dataset.num_classes)
  return np.stack([initial_batch(dataset, rows, i, every, seed, mean, std, dtype)
                   for i in range(ipc)])


def class_chunks(num_classes: int, classes_per_batch: int) -> list[np.ndarray]:
  """Classes of one ipc index split into batches (ImageNet: 10 batches of 100 classes)."""
  size = classes_per_batch or num_classes
  return [np.arange(s, min(s + size, num_classes)) for s in range(0, num_classes, size)]


def batch_key(seed: int, ipc_index: int, chunk: int):
  """Each (ipc index, class chunk) has its own key, whatever device or process runs it."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), ipc_index), chunk)


def owned_batches(ipc: int, num_chunks: int, process_index: int, process_count: int):
  """The (ipc index, chunk) pairs this process synthesises, in order."""
  return [(i, j) for i in range(ipc) if i % process_count == process_index
          for j in range(num_chunks)]


class GroupRunner:
  """Runs up to G batches at once, batch k on devices[k], all with ONE single-device program.

  Inputs are committed to their device with `jax.device_put` and the jitted calls dispatch
  asynchronously, so the devices work concurrently. Each batch computes its own Δθ (nothing is
  reduced across devices), and because every batch runs the same compiled program the results
  do not depend on how many devices or processes share the work. (A `shard_map` over a mesh
  compiles a mesh of one device differently from larger meshes, so its results would change in
  the last bits with the device count.)
  """

  def __init__(self, model, variables, image_shape, mean, std, cfg: SynthesisConfig, devices):
    self.cfg = cfg
    self.devices = list(devices)
    self.size = len(self.devices)
    bn_paths = bn_layer_paths(model, variables, image_shape)
    self._variables = [jax.device_put(variables, d) for d in self.devices]
    self._start = jax.jit(functools.partial(start_batch, model, bn_paths=bn_paths, cfg=cfg))
    self._advance = functools.lru_cache()(lambda n: jax.jit(
        functools.partial(run_iterations, model, num_steps=n, bn_paths=bn_paths, pixel_mean=mean,
                          pixel_std=std, cfg=cfg, unroll=True), donate_argnums=1))

  def _on_device(self, k, *arrays):
    return [jax.device_put(a[k], self.devices[k]) for a in arrays]

  def _chain(self, k, chains):
    """compat_q2: batch k's carry on its device (the empty carry for a first chunk)."""
    if not self.cfg.chained:
      return None
    chain = chains[k] if chains is not None else None
    if chain is None:
      return empty_chain(self._variables[k]["params"])
    return jax.device_put(chain, self.devices[k])

  def start(self, x, labels, keys, draws, chains=None):
    """Per batch k (index k of each argument; draws: AugmentDraws, chains: ChainCarry or None):
    (BatchState, start metrics), each on devices[k]."""
    return [self._start(self._variables[k], *self._on_device(k, x, labels, keys, draws),
                        chain=self._chain(k, chains))
            for k in range(len(x))]

  def advance(self, states, labels, keys, draws, num_steps: int):
    """num_steps iterations of every batch, as blocks of unrolled iterations."""
    per_block = []
    for n in iteration_blocks(num_steps):
      out = [self._advance(n)(self._variables[k], states[k],
                              *self._on_device(k, labels, keys, draws))
             for k in range(len(states))]
      states = [state for state, _ in out]
      per_block.append([m for _, m in out])
    metrics = [jax.tree.map(lambda *xs: np.concatenate(xs), *[b[k] for b in per_block])
               for k in range(len(states))]
    return states, metrics


class Progress:
  """Finished batches (.npz, atomic) and the in-flight group (Orbax) of one method's run."""

  def __init__(self, root: pathlib.Path, fingerprint: dict):
    self.root = root
    stamp = root / "fingerprint.json"
    if stamp.exists() and files.read_json(stamp) != fingerprint:
      print(f"recover: settings changed since the progress in {root} was saved; starting over")
      shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    files.write_json(stamp, fingerprint)
    # One in-flight checkpoint per process, each written by its own process alone.
    process = jax.process_index()
    self.marker = root / f"inflight_p{process}.json"
    (root / f"inflight_p{process}").mkdir(exist_ok=True)
    self.manager = ocp.CheckpointManager(
        (root / f"inflight_p{process}").absolute(), options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=False, enable_async_checkpointing=False,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=process, active_processes={process})))

  def done_path(self, i: int, j: int) -> pathlib.Path:
    return self.root / "done" / f"batch_{i:05d}_{j:03d}.npz"

  def is_done(self, i: int, j: int) -> bool:
    return self.done_path(i, j).exists()

  def save_done(self, i: int, j: int, x: np.ndarray, summary: dict) -> None:
    files.save_npz(self.done_path(i, j), x=x, **{k: np.asarray(v) for k, v in summary.items()})

  def load_done(self, i: int, j: int) -> tuple[np.ndarray, dict]:
    with np.load(self.done_path(i, j)) as f:
      return f["x"], {k: f[k].item() for k in f.files if k != "x"}

  def carry_path(self, i: int, j: int) -> pathlib.Path:
    return self.root / "carry" / f"batch_{i:05d}_{j:03d}.npz"

  def save_carry(self, i: int, j: int, chain: ChainCarry) -> None:
    """compat_q2: what batch (i, j) hands batch (i, j + 1); written before its done file."""
    leaves = jax.tree.leaves(jax.device_get(chain))
    files.save_npz(self.carry_path(i, j), **{f"leaf_{n:04d}": np.asarray(a)
                                             for n, a in enumerate(leaves)})

  def load_carry(self, i: int, j: int, params) -> ChainCarry:
    """The carry batch (i, j) saved, shaped like ChainCarry(params, params)."""
    template = ChainCarry(params, params)
    with np.load(self.carry_path(i, j)) as f:
      leaves = [f[f"leaf_{n:04d}"] for n in range(len(f.files))]
    return jax.tree.unflatten(jax.tree.structure(template), leaves)

  def drop_carry(self, i: int, j: int) -> None:
    self.carry_path(i, j).unlink(missing_ok=True)

  def clear_inflight(self) -> None:
    for step in self.manager.all_steps():
      try:
        self.manager.delete(step)
      except Exception:  # pylint: disable=broad-except
        shutil.rmtree(self.manager.directory / str(step), ignore_errors=True)

  def save_inflight(self, group_id: str, states) -> None:
    """Replaces the in-flight checkpoint; the group marker is written before the state, so a
    kill at any point leaves either a matching pair or nothing to resume from."""
    self.clear_inflight()
    files.write_json(self.marker, {"group": group_id})
    self.manager.save(int(states[0].t), args=ocp.args.StandardSave(_host_tree(states)))
    self.manager.wait_until_finished()

  def load_inflight(self, group_id: str, states):
    """The saved pixels/Adam/t of this group, or None (no checkpoint, or another group's)."""
    step = self.manager.latest_step()
    if step is None or not self.marker.exists() or files.read_json(self.marker)["group"] != group_id:
      return None
    try:
      restored = self.manager.restore(step, args=ocp.args.StandardRestore(_host_tree(states)))
    except Exception as e:  # pylint: disable=broad-except
      # A kill in the middle of a save can leave a step directory Orbax cannot read. The group
      # is a pure function of its inputs, so restarting it gives the same bytes.
      print(f"recover: in-flight checkpoint of batches {group_id} is unreadable "
            f"({type(e).__name__}); restarting them")
      self.clear_inflight()
      return None
    out = []
    for k, state in enumerate(states):
      part = jax.tree.map(lambda a, old: jax.device_put(a[k], old.sharding), restored,
                          _resumable(state))
      out.append(state._replace(**part))
    return out


def _resumable(state: BatchState) -> dict:
  """What an in-flight checkpoint holds: everything the iterations change (start_batch
  recomputes the rest)."""
  part = {"x": state.x, "adam": state.adam, "t": state.t}
  if state.weight_grad_sum is not None:
    part["weight_grad_sum"] = state.weight_grad_sum
  return part


def _host_tree(states) -> dict:
  """The resumable part of a group's states, stacked on the host."""
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                      *[_resumable(s) for s in states])


def variables_digest(variables) -> str:
  """sha256 of the teacher's variables: progress saved against another teacher is stale."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(variables)):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def _summary(metrics, first_bn_weight: float) -> dict:
  bn = np.asarray(metrics["bn_terms"][-1], np.float64)
  weights = np.asarray(bn_layer_weights(len(bn), first_bn_weight), np.float64)
  return {"final_ce": float(metrics["ce"][-1]), "final_bn_loss": float(bn @ weights)}


def batch_draws(seed: int, ipc_index: int, chunk: int, cfg: SynthesisConfig, image_hw):
  """The augmentation draws of batch (ipc index, chunk): a function of the seed alone."""
  return draw_augmentation(batch_key(seed, ipc_index, chunk), cfg.iterations, cfg, image_hw)


def batch_groups(todo: list, size: int, chained: bool) -> list[list]:
  """The batches run together, up to `size` at a time (one per device). Chained (compat_q2):
  chunk j of an ipc index needs chunk j − 1's carry, so a group holds the same step of up to
  `size` different ipc indices' chains."""
  if not chained:
    return [todo[g:g + size] for g in range(0, len(todo), size)]
  chains = {}
  for i, j in todo:
    chains.setdefault(i, []).append((i, j))
  ipcs, groups = list(chains), []
  for g in range(0, len(ipcs), size):
    block = [chains[i] for i in ipcs[g:g + size]]
    for step in range(max(len(c) for c in block)):
      groups.append([c[step] for c in block if step < len(c)])
  return groups


def synthesize_owned(config, workdir, method: str, train, model, variables, meta,
                     devices=None, process_index: int = 0, process_count: int = 1) -> Progress:
  """Synthesises this process's batches into <workdir>/progress/<method>/, resuming any
  earlier progress of the same settings. Runs in the teacher's float dtype."""
  config = compat.resolve(config)
  rc = config.recover
  cfg = synthesis_config(rc, method)
  mean, std = compat.pixel_normalisation(config, meta)
  image_shape = tuple(meta["image_shape"])
  dtype = jax.tree.leaves(variables["params"])[0].dtype
  chunks = class_chunks(train.num_classes, rc.classes_per_batch)
  if len({len(c) for c in chunks}) > 1:
    raise ValueError(f"recover.classes_per_batch={rc.classes_per_batch} must divide the "
                     f"{train.num_classes} classes.")
  cfg = engine_config(cfg, len(chunks))
  fingerprint = {"synthesis": dataclasses.asdict(cfg), "seed": config.seed, "ipc": config.ipc,
                 "dataset": config.dataset, "init": init_kind(rc, method),
                 "classes_per_batch": rc.classes_per_batch, "teacher": meta,
                 "normalisation": [list(mean), list(std)], "dtype": str(dtype),
                 "teacher_sha256": variables_digest(variables)}
  progress = Progress(pathlib.Path(workdir) / "progress" / method, fingerprint)
  owned = owned_batches(config.ipc, len(chunks), process_index, process_count)
  todo = [b for b in owned if not progress.is_done(*b)]
  log = files.MetricsLog(pathlib.Path(workdir) / "metrics.jsonl")
  if len(todo) < len(owned):
    print(f"recover: {method}: resuming, {len(owned) - len(todo)} of {len(owned)} batches done")
    log.write(f"recover/{method}/resume", 0, finished_batches=len(owned) - len(todo))
  if not todo:
    return progress
  devices = list(devices or jax.local_devices())[:len(todo)]
  runner = GroupRunner(model, variables, image_shape, mean, std, cfg, devices)
  rows = initial_rows(train, config.ipc, config.seed, init_kind(rc, method))
  every = rc.checkpoint_every or cfg.iterations
  chained = cfg.chained
  with tqdm.tqdm(total=len(todo) * cfg.iterations, desc=f"recover: {method}",
                  unit="batch-it", mininterval=1.0) as bar:
    for group in batch_groups(todo, runner.size, chained):
      # The random-Δθ ablation's key (the draws use the batch key's other half).
      aug_keys = [jax.random.split(batch_key(config.seed, i, j))[1] for i, j in group]
      draws = [batch_draws(config.seed, i, j, cfg, image_shape[:2]) for i, j in group]
      labels = jnp.asarray(np.stack([chunks[j] for _, j in group]))
      x_init = jnp.asarray(np.stack([initial_batch(train, rows, i, chunks[j], config.seed, mean,
                                                   std, dtype) for i, j in group]))
      chains = ([progress.load_carry(i, j - 1, variables["params"]) if j > 0 else None
                 for i, j in group] if chained else None)
      group_id = ",".join(f"{i}:{j}" for i, j in group)
      started = time.time()
      out = runner.start(x_init, labels, aug_keys, draws, chains)
      states, start_metrics = [o[0] for o in out], [o[1] for o in out]
      restored = progress.load_inflight(group_id, states)
      if restored:
        states = restored
        print(f"recover: {method}: batches {group_id} resume at iteration {int(states[0].t)}")
        log.write(f"recover/{method}/resume", int(states[0].t), group=group_id,
                  inflight_iteration=int(states[0].t))
      bar.update(len(group) * int(states[0].t))
      metrics = None
      while int(states[0].t) < cfg.iterations:
        n = min(every, cfg.iterations - int(states[0].t))
        states, metrics = runner.advance(states, labels, aug_keys, draws, n)
        if not all(np.all(np.isfinite(m["ce"])) and np.all(np.isfinite(m["bn_terms"]))
                   for m in metrics):
          raise FloatingPointError(
              f"recover: the synthesis loss became non-finite (NaN/inf) in batches {group}; lower "
              "recover.lr or check the teacher checkpoint.")
        if int(states[0].t) < cfg.iterations:
          progress.save_inflight(group_id, states)
        bar.update(len(group) * n)
        bar.set_postfix(ce=f"{metrics[0]['ce'][-1]:.3f}")
      if metrics is None:
        raise RuntimeError("in-flight checkpoint at the final iteration; delete progress and rerun")
      for k, (i, j) in enumerate(group):
        summary = {"ipc_index": i, "chunk": j,
                   **{name: float(start_metrics[k][name]) for name in ("delta_norm",
                                                                       "delta_norm_chunk")
                      if name in start_metrics[k]},
                   **_summary(metrics[k], cfg.first_bn_weight)}
        if chained:
          progress.save_carry(i, j, states[k].chain())
        progress.save_done(i, j, np.asarray(states[k].x), summary)
        if chained and j > 0:
          progress.drop_carry(i, j - 1)
        seconds = (time.time() - started) / len(group)
        log.write(f"recover/{method}", i * len(chunks) + j, seconds=seconds,
                  image_iterations_per_second=len(chunks[j]) * cfg.iterations / seconds,
                  **summary)
      progress.clear_inflight()
  return progress


def wait_for_batches(progress: Progress, ipc: int, num_chunks: int, timeout_s: float) -> None:
  """Process 0 waits until every process's batches are on disk (a shared work directory)."""
  deadline = time.time() + timeout_s
  missing = [(i, j) for i in range(ipc) for j in range(num_chunks) if not progress.is_done(i, j)]
  while missing:
    if time.time() > deadline:
      raise TimeoutError(f"recover: {len(missing)} batches from other processes did not appear "
                         f"in {progress.root} within {timeout_s:.0f} s.")
    time.sleep(1.0)
    missing = [b for b in missing if not progress.is_done(*b)]


GRID_MAX_ROWS, GRID_MAX_CLASSES = 10, 20


def write_outputs(out_dir: pathlib.Path, progress: Progress, config, method: str, meta,
                  num_classes: int, chunks, stage: dict | None = None) -> dict:
  """Streams the finished batches (in ipc/class order, one batch in memory at a time) into the
  outputs, then the manifest.

  images.npz (uncompressed, row n = ipc index n // C, class n % C) always holds the set students
  train on: the last iterate in [0, 1] (lossless), or with recover.compat_jpeg the decoded JPEGs
  of the authors' format, saved in their layout jpg/new{c:03d}/class{c:03d}_id{i:03d}.jpg (the
  lossless set then goes to images_lossless.npz; else 8-bit PNGs go to png/).
  """
  config = compat.resolve(config)
  image_shape = tuple(meta["image_shape"])
  mean, std = (np.asarray(v) for v in compat.pixel_normalisation(config, meta))
  jpeg = bool(config.recover.compat_jpeg)
  n_images = config.ipc * num_classes
  labels = np.tile(np.arange(num_classes, dtype=np.int32), config.ipc)
  norm = {"mean": mean.astype(np.float32), "std": std.astype(np.float32)}
  shown = min(num_classes, GRID_MAX_CLASSES)
  grid = np.zeros((min(config.ipc, GRID_MAX_ROWS), shown, *image_shape), np.float32)
  stats = {"lossless": files.PixelStatistics(), **({"jpeg": files.PixelStatistics()} if jpeg else {})}
  written, batches = ["images.npz"] + (["images_lossless.npz"] if jpeg else []), []
  with files.NpzWriter(out_dir / "images.npz") as main, (
      files.NpzWriter(out_dir / "images_lossless.npz") if jpeg else contextlib.nullcontext()
  ) as lossless:
    with contextlib.ExitStack() as streams:
      write_main = streams.enter_context(main.rows("images", (n_images, *image_shape),
                                                   np.float32))
      if jpeg:
        write_lossless = streams.enter_context(lossless.rows("images", (n_images, *image_shape),
                                                             np.float32))
      for i in range(config.ipc):
        for j, classes in enumerate(chunks):
          x, summary = progress.load_done(i, j)
          batches.append(summary)
          pixels = np.clip(x * std + mean, 0.0, 1.0).astype(np.float32)  # de-normalise
          stats["lossless"].update(pixels)
          if jpeg:
            write_lossless(pixels)
            blobs = [compat.official_jpeg_bytes(image) for image in pixels]
            for c, blob in zip(classes, blobs):
              name = f"jpg/new{c:03d}/class{c:03d}_id{i:03d}.jpg"
              files.write_bytes(out_dir / name, blob)
              written.append(name)
            pixels = np.stack([compat.decode_jpeg(b, image_shape[-1]) for b in blobs]
                              ).astype(np.float32) / 255.0
            stats["jpeg"].update(pixels)
          else:
            written += [f"png/{f}" for f in files.save_image_folder(
                out_dir / "png", pixels, classes, ids=np.full(len(classes), i))]
          write_main(pixels)
          if i < len(grid):
            keep = classes < shown
            grid[i, classes[keep]] = pixels[keep]
    for writer in (main, lossless) if jpeg else (main,):
      writer.add("labels", labels)
      for key, value in norm.items():
        writer.add(key, value)
  return _finish_outputs(out_dir, config, method, meta, chunks, grid, stats, batches, written,
                         mean, std, n_images, stage)


def _finish_outputs(out_dir, config, method, meta, chunks, grid, stats, batches, written, mean,
                    std, n_images, stage) -> dict:
  image_shape = grid.shape[2:]
  files.save_png(out_dir / "grid.png",
                 files.image_grid(grid.reshape(-1, *image_shape), grid.shape[0], grid.shape[1]))
  written.append("grid.png")
  summary = {"method": method, "ipc": config.ipc, "num_images": n_images,
             "synthesis": dataclasses.asdict(engine_config(synthesis_config(config.recover, method),
                                                           len(chunks))),
             "init": init_kind(config.recover, method), "seed": config.seed, "teacher": meta,
             "normalisation": {"mean": mean.tolist(), "std": std.tolist()},
             "format": "jpeg_q75" if config.recover.compat_jpeg else "lossless",
             "compat": compat.settings(config),
             "pixel_statistics": {k: s.result() for k, s in stats.items()},
             "stage": stage, "batches": batches}
  files.write_json(out_dir / "recover.json", summary)
  written.append("recover.json")
  files.write_json(out_dir / "manifest.json",
                   {"files": {name: files.sha256(out_dir / name) for name in written}})
  return summary


def run(config, workdir, method: str, devices=None) -> dict | None:
  """Synthesises `config.ipc` images per class with `method` and saves them under
  `<workdir>/synthetic/<method>/`: images.npz (float32 in [0, 1], lossless), png/classNNN/*.png,
  grid.png (rows = ipc index, columns = classes), recover.json (settings, per-batch metrics) and
  manifest.json (sha256 of every file, written last). Returns the summary on process 0."""
  if config.ipc < 1:
    raise ValueError(f"ipc must be >= 1, got {config.ipc}.")
  config = compat.resolve(config)
  train = data.load_dataset(config.dataset, "train", config.data_dir)
  model, variables, meta = squeeze.load_teacher(workdir, train)
  chunks = class_chunks(train.num_classes, config.recover.classes_per_batch)
  if config.ipc > np.min(np.bincount(train.labels, minlength=train.num_classes)):
    data.sample_per_class(train, config.ipc, config.seed)  # raises the clear DataError
  p, n = jax.process_index(), jax.process_count()
  progress = synthesize_owned(config, workdir, method, train, model, variables, meta, devices,
                              p, n)
  if p != 0:
    return None
  wait_for_batches(progress, config.ipc, len(chunks), config.recover.wait_timeout_s)
  out_dir = pathlib.Path(workdir) / "synthetic" / method
  # Every process runs on `devices` (default: all its local devices).
  stage = {"devices": len(devices or jax.local_devices()) * n, "processes": n}
  summary = write_outputs(out_dir, progress, config, method, meta, train.num_classes, chunks,
                          stage)
  shutil.rmtree(progress.root)  # everything is in the outputs now
  print(f"recover: {method} wrote {summary['num_images']} images to {out_dir}")
  return summary
