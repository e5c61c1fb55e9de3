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

import dataclasses
import functools
import pathlib
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import auto as tqdm

from dwa_jax import data, files, squeeze, train_lib
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


def synthesis_view(x, offset, key, augment: str):
  """The augmented copy the teacher sees at one iteration (one transform for the whole batch)."""
  if augment == "crop_flip_roll":
    from dwa_jax import augment as aug  # pylint: disable=g-import-not-at-top
    crop_key, flip_key = jax.random.split(key)
    x = aug.random_resized_crop(crop_key, x, x.shape[1], per_example=False)
    x = aug.random_flip(flip_key, x, per_example=False)
  return jnp.roll(x, (offset[0], offset[1]), axis=(1, 2))


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


def directed_weight_adjustment(model, params, batch_stats, x, view, labels, bn_paths,
                               cfg: SynthesisConfig):
  """K steps Δθ += (ρ/K)·g/(‖g‖+1e-12), g = ∇_θ CE(f_{θ+Δθ}(view(x))), one global norm over θ.

  All parameters move (BN affine included); running statistics do not. Returns Δθ, the image
  gradient the official code accumulates during the ascent (for compat_q1; zeros otherwise) and
  per-pass metrics (CE before each update, BN terms).
  """

  def ce_and_terms(delta, x):
    logits, stats = forward_with_bn_stats(model, _add(params, delta), batch_stats, view(x), bn_paths)
    return cross_entropy(logits, labels), bn_matching_terms(stats, batch_stats, bn_paths, cfg.r_var)

  grad_fn = jax.value_and_grad(ce_and_terms, argnums=(0, 1) if cfg.compat_q1 else 0, has_aux=True)

  def ascent_step(carry, _):
    delta, x_grad_sum = carry
    (ce, terms), grads = grad_fn(delta, x)
    if cfg.compat_q1:
      g, x_grad = grads
      x_grad_sum = x_grad_sum + x_grad
    else:
      g = grads
    scale = (cfg.rho / cfg.adjust_steps) / (optax.tree.norm(g) + 1e-12)
    delta = jax.tree.map(lambda d, gi: d + scale * gi, delta, g)
    return (delta, x_grad_sum), {"ce": ce, "bn_terms": terms}

  delta0 = jax.tree.map(jnp.zeros_like, params)
  (delta, x_grad_sum), metrics = jax.lax.scan(
      ascent_step, (delta0, jnp.zeros_like(x)), None, length=cfg.adjust_steps)
  return delta, x_grad_sum, metrics


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


def synthesize_batch(model, variables, x_init, labels, key, offsets, *, bn_paths, pixel_mean,
                     pixel_std, cfg: SynthesisConfig):
  """Optimises one synthetic batch. Pure and jit-able (model, bn_paths, cfg static).

  Args:
    variables: the frozen teacher's {'params', 'batch_stats'}.
    x_init: (N, H, W, C) normalised initial images (real images for DWA, noise for SRe2L).
    labels: (N,) int labels.
    key: randomness for crop/flip augmentation and the random-Δθ ablation.
    offsets: (T, 2) int roll offsets (see `draw_jitter_offsets`).
  Returns:
    the final normalised images and a metrics dict: per iteration `ce`, `bn_terms` (T, L),
    `grad_norm`, `lr`; per ascent pass `adjust_ce`, `adjust_bn_terms`; and `delta_norm`.
  """
  params, batch_stats = variables["params"], variables["batch_stats"]
  dtype = x_init.dtype
  aug_keys = jax.random.split(key, cfg.iterations + 1)
  layer_w = bn_layer_weights(len(bn_paths), cfg.first_bn_weight).astype(dtype)
  lo, hi = pixel_bounds(pixel_mean, pixel_std, dtype)
  view_at = lambda t: (lambda x: synthesis_view(x, offsets[t], aug_keys[t], cfg.augment))

  adjust_metrics = {}
  extra_first_grad = jnp.zeros_like(x_init)
  if cfg.method == "dwa":
    delta, extra_first_grad, adjust_metrics = directed_weight_adjustment(
        model, params, batch_stats, x_init, view_at(0), labels, bn_paths, cfg)
    adjust_metrics = {"adjust_ce": adjust_metrics["ce"],
                      "adjust_bn_terms": adjust_metrics["bn_terms"]}
  elif cfg.method == "random":
    delta = random_weight_adjustment(aug_keys[-1], params, cfg.rho)
  else:
    delta = None
  model_params = params if delta is None else _add(params, delta)

  def loss_fn(x, t):
    return synthesis_loss(model, model_params, batch_stats, view_at(t)(x), labels, bn_paths,
                          layer_w, cfg)

  adam = optax.scale_by_adam(b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps)

  def step(carry, t):
    x, adam_state = carry
    (_, (ce, terms)), grad = jax.value_and_grad(loss_fn, has_aux=True)(x, t)
    grad = grad + jnp.where(t == 0, extra_first_grad, jnp.zeros_like(grad))
    lr = cosine_lr(t, cfg.iterations, cfg.lr, dtype)
    direction, adam_state = adam.update(grad, adam_state)
    x = jnp.clip(x - lr * direction, lo, hi)
    return (x, adam_state), {"ce": ce, "bn_terms": terms, "grad_norm": jnp.linalg.norm(grad),
                             "lr": lr}

  (x, _), metrics = jax.lax.scan(step, (x_init, adam.init(x_init)), jnp.arange(cfg.iterations))
  delta_norm = jnp.zeros((), dtype) if delta is None else optax.tree.norm(delta)
  return x, {**metrics, **adjust_metrics, "delta_norm": delta_norm}


def make_synthesizer(model, variables, image_shape, pixel_mean, pixel_std,
                     cfg: SynthesisConfig) -> Callable:
  """A jitted `(variables, x_init, labels, key, offsets) -> (images, metrics)` for this teacher."""
  bn_paths = bn_layer_paths(model, variables, image_shape)
  fn = functools.partial(synthesize_batch, model, bn_paths=bn_paths, pixel_mean=pixel_mean,
                         pixel_std=pixel_std, cfg=cfg)
  return jax.jit(fn)


def delta_theta(model, variables, x, labels, offset, *, image_shape, cfg: SynthesisConfig):
  """The DWA adjustment alone, on roll `offset` of `x`, for inspection and tests.

  Returns (Δθ, the ascent's accumulated image gradient (zeros unless cfg.compat_q1), metrics).
  """
  bn_paths = bn_layer_paths(model, variables, image_shape)
  view = lambda x: synthesis_view(x, offset, None, "roll")
  return directed_weight_adjustment(
      model, variables["params"], variables["batch_stats"], x, view, labels, bn_paths, cfg)


# ============================================================================= the recover stage

def synthesis_config(rc, method: str) -> SynthesisConfig:
  """ml_collections `config.recover` -> the engine's config for `method` (SRe2L: r_var = 1)."""
  return SynthesisConfig(
      method=method, iterations=rc.iterations, lr=rc.lr, r_bn=rc.r_bn,
      r_var=rc.sre2l_r_var if method == "sre2l" else rc.r_var,
      first_bn_weight=rc.first_bn_weight, adjust_steps=rc.adjust_steps, rho=rc.rho,
      jitter=rc.jitter, augment=rc.augment, compat_q1=rc.compat_q1)


def init_kind(rc, method: str) -> str:
  """'real' (DWA and the random ablation) or 'noise' (SRe2L), unless the config forces one."""
  if rc.init in ("real", "noise"):
    return rc.init
  return "noise" if method == "sre2l" else "real"


def initial_batches(dataset, ipc: int, seed: int, kind: str, mean, std) -> np.ndarray:
  """(ipc, num_classes, H, W, C) normalised starting images; row i initialises ipc index i.

  'real': `data.sample_per_class(dataset, ipc, seed)` draws ipc distinct training images per
  class with numpy's default_rng(seed) (deterministic, documented there). 'noise': N(0, 1) in
  normalised space, as SRe2L, from jax.random.key(seed).
  """
  if kind == "real":
    idx = data.sample_per_class(dataset, ipc, seed)
    return np.asarray(train_lib.normalize(dataset.images[idx], mean, std))
  shape = (ipc, dataset.num_classes, *dataset.images.shape[1:])
  return np.asarray(jax.random.normal(jax.random.key(seed), shape, jnp.float32))


def class_chunks(num_classes: int, classes_per_batch: int) -> list[np.ndarray]:
  """Classes of one ipc index split into batches (ImageNet: 10 batches of 100 classes)."""
  size = classes_per_batch or num_classes
  return [np.arange(s, min(s + size, num_classes)) for s in range(0, num_classes, size)]


def batch_key(seed: int, ipc_index: int, chunk: int):
  """Each (ipc index, class chunk) has its own key, whatever device or process runs it."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), ipc_index), chunk)


def run(config, workdir, method: str) -> dict:
  """Synthesises `config.ipc` images per class with `method` and saves them under
  `<workdir>/synthetic/<method>/`: images.npz (float32 in [0, 1], lossless), png/classNNN/*.png,
  grid.png (rows = ipc index, columns = classes) and recover.json (settings, per-batch metrics)."""

  rc = config.recover
  if config.ipc < 1:
    raise ValueError(f"ipc must be >= 1, got {config.ipc}.")
  train = data.load_dataset(config.dataset, "train", config.data_dir)
  model, variables, meta = squeeze.load_teacher(workdir, train)
  mean, std = tuple(meta["mean"]), tuple(meta["std"])
  cfg = synthesis_config(rc, method)
  image_shape = tuple(meta["image_shape"])
  synthesize = make_synthesizer(model, variables, image_shape, mean, std, cfg)
  starts = initial_batches(train, config.ipc, config.seed, init_kind(rc, method), mean, std)
  log = files.MetricsLog(pathlib.Path(workdir) / "metrics.jsonl")
  out_dir = pathlib.Path(workdir) / "synthetic" / method

  images = np.zeros((config.ipc, train.num_classes, *image_shape), np.float32)
  per_batch = []
  chunks = class_chunks(train.num_classes, rc.classes_per_batch)
  bar = tqdm.tqdm(total=config.ipc * len(chunks), desc=f"recover: {method}", unit="batch")
  for i in range(config.ipc):
    for j, classes in enumerate(chunks):
      start = time.time()
      offset_key, aug_key = jax.random.split(batch_key(config.seed, i, j))
      offsets = draw_jitter_offsets(offset_key, cfg.iterations, cfg.jitter)
      x, metrics = synthesize(variables, jnp.asarray(starts[i, classes]), jnp.asarray(classes),
                              aug_key, offsets)
      x, metrics = jax.device_get((x, metrics))
      if not np.all(np.isfinite(x)):
        raise FloatingPointError(f"recover: non-finite pixels in ipc {i}, classes "
                                 f"{classes[0]}-{classes[-1]}; lower recover.lr or check the teacher.")
      images[i, classes] = x
      stats = {"ipc_index": i, "classes": [int(classes[0]), int(classes[-1])],
               "final_ce": float(metrics["ce"][-1]),
               "final_bn_loss": float(metrics["bn_terms"][-1] @ np.asarray(
                   bn_layer_weights(metrics["bn_terms"].shape[1], cfg.first_bn_weight))),
               "delta_norm": float(metrics["delta_norm"]), "seconds": time.time() - start}
      per_batch.append(stats)
      log.write(f"recover/{method}", len(per_batch), **stats)
      bar.set_postfix(ce=f"{stats['final_ce']:.3f}", bn=f"{stats['final_bn_loss']:.3f}")
      bar.update()
  bar.close()

  pixels = np.clip(images * np.asarray(std) + np.asarray(mean), 0.0, 1.0)  # de-normalise
  labels = np.broadcast_to(np.arange(train.num_classes), (config.ipc, train.num_classes))
  flat, flat_labels = pixels.reshape(-1, *image_shape), labels.reshape(-1)
  files.save_npz(out_dir / "images.npz", images=flat.astype(np.float32),
                 labels=flat_labels.astype(np.int32), mean=np.asarray(mean), std=np.asarray(std))
  files.save_image_folder(out_dir / "png", flat, flat_labels)
  shown = min(train.num_classes, 20)
  files.save_png(out_dir / "grid.png",
                 files.image_grid(pixels[:, :shown].reshape(-1, *image_shape), config.ipc, shown))
  summary = {"method": method, "ipc": config.ipc, "num_images": len(flat_labels),
             "synthesis": dataclasses.asdict(cfg), "init": init_kind(rc, method),
             "teacher": meta, "batches": per_batch}
  files.write_json(out_dir / "recover.json", summary)
  print(f"recover: {method} wrote {len(flat_labels)} images to {out_dir}")
  return summary
