"""The synthesis maths of recover: one synthetic batch against a frozen BatchNorm teacher (SRe2L,
and DWA's directed Δθ), as pure functions; the stage (recover.py) dispatches them.

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
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dwa_jax import arithmetic
from dwa_jax import augment as augment_lib
from dwa_jax.models.layers import BN_STATS, BatchNorm

METHODS = ("dwa", "sre2l", "random")
DELTA_FORMS = ("direct", "split")  # how Δθ enters the teacher: SynthesisConfig.delta_form
AUGMENTS = ("roll", "crop_flip_roll")  # the views of the synthetic batch: SynthesisConfig.augment


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
  # Quirk Q1 of the official code: the K ascent passes' ∂CE/∂x leak into step 0.
  compat_q1: bool = False
  # Quirk Q2 (official ImageNet code, DWA only): Δθ accumulates along the class-chunks of an
  # ipc index, and each chunk's weight gradients leak into the next one's ascent (`ChainCarry`).
  compat_q2: bool = False
  # 'bfloat16': the teacher's convolutions and matmuls in bfloat16; None: the teacher's dtype.
  compute_dtype: str | None = None
  # How Δθ enters the teacher's Conv/Dense layers: 'direct' (θ + Δθ) or 'split'
  # (layer(x; θ) + layer(x; Δθ)); see `forward_with_bn_stats`.
  delta_form: str = "direct"
  # Mantissa bits with which the platform reads float32 weights (`arithmetic.matmul_input_bits`;
  # None: exact), for the Δθ-survival figure; set by the recover stage.
  platform_bits: int | None = None
  # Emulation: every convolution and matmul reads its inputs and weights (and, backward, its
  # cotangent) rounded to this many mantissa bits (recover.emulate: 10 TF32, 7 bfloat16).
  emulate_bits: int | None = None
  # A committee of this many teachers of one architecture (leading teacher axis on the
  # variables, `stack_teachers`): the loss is the mean over the teachers, each with its own Δθ.
  committee: int = 1

  @property
  def weight_bits(self) -> int | None:
    """The mantissa bits the teacher's Conv/Dense layers read their weights with, as run."""
    if self.compute_dtype == "bfloat16":
      return arithmetic.BFLOAT16_BITS
    return self.emulate_bits if self.emulate_bits is not None else self.platform_bits

  @property
  def chained(self) -> bool:
    """Whether quirk Q2 acts: it chains DWA's weight adjustment, which the others do not have."""
    return self.compat_q2 and self.method == "dwa"

  def __post_init__(self):
    errors = []
    for name, allowed in (("method", METHODS), ("augment", AUGMENTS),
                          ("delta_form", DELTA_FORMS)):
      if getattr(self, name) not in allowed:
        errors.append(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
    for name in ("iterations", "committee"):
      if getattr(self, name) < 1:
        errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.method == "dwa" and self.adjust_steps < 1:
      errors.append(f"adjust_steps (K) must be >= 1 for DWA, got {self.adjust_steps}")
    for name in ("lr", "r_bn", "r_var", "first_bn_weight", "rho", "jitter"):
      if getattr(self, name) < 0:
        errors.append(f"{name} must be >= 0, got {getattr(self, name)}")
    if self.compute_dtype not in (None, "bfloat16", "float32"):
      errors.append(f"compute_dtype must be None, 'float32' or 'bfloat16', got "
                    f"{self.compute_dtype!r}")
    for name in ("platform_bits", "emulate_bits"):
      bits = getattr(self, name)
      if bits is not None and not 1 <= bits <= 23:
        errors.append(f"{name} must be None or 1..23 mantissa bits, got {bits}")
    if self.emulate_bits is not None and self.compute_dtype == "bfloat16":
      errors.append("emulate_bits emulates a matrix unit's arithmetic in float32: it does not "
                    "combine with compute_dtype='bfloat16'")
    if self.committee > 1 and self.method == "dwa" and (self.compat_q1 or self.compat_q2):
      errors.append("the authors' quirks Q1/Q2 are single-teacher behaviours: turn them off "
                    "for a committee of teachers")
    if errors:
      raise ValueError("Invalid synthesis config: " + "; ".join(errors))


SRE2L_R_VAR = 1.0  # SRe2L's weight of the BN variance term (DWA's is SynthesisConfig.r_var)


def sre2l_config(**overrides) -> SynthesisConfig:
  """SRe2L: no weight adjustment and r_var = SRE2L_R_VAR (its initialisation is Gaussian noise)."""
  return SynthesisConfig(**{"method": "sre2l", "r_var": SRE2L_R_VAR, **overrides})


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


def stack_teachers(teachers: Sequence[Any]) -> Any:
  """Variables of teachers of one architecture -> one pytree whose leaves carry a leading
  teacher axis (a committee, SynthesisConfig.committee = len(teachers))."""
  first = jax.tree.structure(teachers[0])
  for k, other in enumerate(teachers[1:], 1):
    if jax.tree.structure(other) != first or not all(jax.tree.leaves(
        jax.tree.map(lambda a, b: a.shape == b.shape, teachers[0], other))):
      raise ValueError(f"committee teacher {k} does not have the first teacher's architecture "
                       "(its variables differ in names or shapes)")
  return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *teachers)


def first_teacher(variables, cfg: "SynthesisConfig"):
  """The committee's first teacher (or the single teacher): the layout every teacher shares."""
  return jax.tree.map(lambda a: a[0], variables) if cfg.committee > 1 else variables


def _teacher_layer_arithmetic(delta_params, input_bits: int | None, compute_dtype):
  """An interceptor of the teacher's Conv and Dense layers, the one place that sets the
  arithmetic of their products:
  - `compute_dtype` (bfloat16): inputs and weights read in it, products summed and returned in
    float32 (as TPU and GPU matrix units accumulate), so BatchNorm and the rest stay float32;
  - `input_bits` (an emulation, on any backend): inputs and weights rounded to that many
    mantissa bits with a straight-through gradient, the backward products reading the output's
    cotangent rounded the same way; products and sums in float32;
  - `delta_params` (the split form): layer(x; θ) + layer(x; Δθ), summed in float32."""
  busy = [False]
  if compute_dtype is not None:
    operand = lambda a: a.astype(compute_dtype)
  elif input_bits is not None:
    operand = lambda a: arithmetic.read_as(a, input_bits)
  else:
    operand = lambda a: a
  wide = lambda f: functools.partial(f, preferred_element_type=jnp.float32)

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if (busy[0] or context.method_name != "__call__"
        or not isinstance(module, (nn.Conv, nn.Dense))):
      return next_fun(*args, **kwargs)
    busy[0] = True  # the layers applied below are Conv/Dense too: not intercepted again
    try:
      accumulate = ({} if compute_dtype is None else
                    {"conv_general_dilated": wide(jax.lax.conv_general_dilated)}
                    if isinstance(module, nn.Conv) else {"dot_general": wide(jax.lax.dot_general)})
      layer = module.clone(parent=None, **accumulate)
      x = operand(args[0])
      apply = lambda p: layer.apply({"params": jax.tree.map(operand, p)}, x, *args[1:], **kwargs)
      y = apply(module.variables["params"])
      if delta_params is not None:
        y = y + apply(_at(delta_params, module.path))
      if input_bits is not None:
        y = arithmetic.cotangent_read_as(y, input_bits)
    finally:
      busy[0] = False
    return y

  return intercept


def forward_with_bn_stats(model, params, batch_stats, x, bn_paths, compute_dtype=None,
                          delta=None, delta_form: str = "direct", input_bits: int | None = None):
  """Eval-mode logits plus the (mean, biased var) of each BN layer's input, in call order, of
  the teacher at θ (`params`) + Δθ (`delta`, None: none).

  `compute_dtype` (e.g. bfloat16): convolutions and matmuls read their inputs and weights in it
  and sum in float32; BN statistics, normalisation and logits stay float32.

  `delta_form` says how Δθ enters the Conv/Dense layers (BN's scale and bias always take
  θ + Δθ in float32): 'direct', one layer on θ + Δθ, exact in float32 on the CPU; 'split',
  layer(x; θ) + layer(x; Δθ), so each weight tensor is rounded relative to its own size where
  the arithmetic rounds weights (bfloat16, TF32: dwa_jax/arithmetic.py).

  `input_bits` (7: bfloat16, 10: TF32) emulates a matrix unit that reads the float32 inputs
  and weights of every convolution and matmul, forward and backward, with that many mantissa
  bits (recover.emulate).
  """
  if delta_form not in DELTA_FORMS:
    raise ValueError(f"delta_form must be one of {DELTA_FORMS}, got {delta_form!r}")
  split = delta is not None and delta_form == "split"
  if delta is not None:
    # BN parameters (and with the direct form every parameter) on θ + Δθ in float32.
    params = jax.tree.map(lambda p, d, kernel: p if (split and kernel) else p + d, params,
                          delta, arithmetic.kernel_mask(params))
  if compute_dtype is not None and jnp.dtype(compute_dtype) == x.dtype:
    compute_dtype = None
  intercept = (nn.intercept_methods(_teacher_layer_arithmetic(
      delta if split else None, input_bits, compute_dtype))
      if split or input_bits is not None or compute_dtype is not None
      else contextlib.nullcontext())
  with intercept:
    logits, state = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                train=False, capture_stats=True, mutable=[BN_STATS])
  stats = [_at(state[BN_STATS], p)["mean_var"][0] for p in bn_paths]
  return logits.astype(x.dtype), stats


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


def _ce_and_terms(model, params, batch_stats, x_view, labels, bn_paths, cfg, delta):
  """CE and the per-layer BN-matching terms of the teacher at θ + Δθ on one augmented view."""
  logits, stats = forward_with_bn_stats(model, params, batch_stats, x_view, bn_paths,
                                        cfg.compute_dtype, delta, cfg.delta_form, cfg.emulate_bits)
  return cross_entropy(logits, labels), bn_matching_terms(stats, batch_stats, bn_paths, cfg.r_var)


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


def _loop(step, carry, xs, unroll: bool):
  """`lax.scan(step, carry, xs)`, or with `unroll` its steps traced one after another (XLA:CPU
  runs convolutions inside loops several times slower; a scan's scratch memory is one step's)."""
  if not unroll:
    return jax.lax.scan(step, carry, xs)
  per_step = []
  for i in range(len(xs)):
    carry, m = step(carry, xs[i])
    per_step.append(m)
  return carry, jax.tree.map(lambda *ms: jnp.stack(ms), *per_step)


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
                               cfg: SynthesisConfig, chain: ChainCarry | None = None,
                               unroll: bool = True):
  """K steps Δθ += (ρ/K)·g/(‖g‖+1e-12), g = ∇_θ CE(f_{θ+Δθ}(view(x))), one global norm over θ.

  All parameters move (BN affine included); running statistics do not. With a `chain` (quirk
  Q2) Δθ starts from chain.delta and the first step's g also holds chain.weight_grad. Returns
  Δθ, the image gradient the official code accumulates during the ascent (for compat_q1; zeros
  otherwise) and per-pass metrics (CE before each update, BN terms). `unroll`: see `_loop`
  (unrolled, the scratch memory is about K passes': RESULTS.md).
  """
  ce_and_terms = lambda delta, x: _ce_and_terms(model, params, batch_stats, view(x), labels,
                                                 bn_paths, cfg, delta)
  grad_fn = jax.value_and_grad(ce_and_terms, argnums=(0, 1) if cfg.compat_q1 else 0, has_aux=True)

  def ascent_step(carry, k):
    delta, x_grad_sum = carry
    (ce, terms), grads = grad_fn(delta, x)
    if cfg.compat_q1:
      g, x_grad = grads
      x_grad_sum = x_grad_sum + x_grad
    else:
      g = grads
    if chain is not None:  # Q2: the previous chunk's weight gradients join the first step's
      g = jax.tree.map(lambda leak, gi: jnp.where(k == 0, leak + gi, gi), chain.weight_grad, g)
    scale = (cfg.rho / cfg.adjust_steps) / (optax.tree.norm(g) + 1e-12)
    delta = jax.tree.map(lambda d, gi: d + scale * gi, delta, g)
    return (delta, x_grad_sum), {"ce": ce, "bn_terms": terms}

  start = jax.tree.map(jnp.zeros_like, params) if chain is None else chain.delta
  (delta, x_grad_sum), metrics = _loop(ascent_step, (start, jnp.zeros_like(x)),
                                       jnp.arange(cfg.adjust_steps), unroll)
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
                   cfg: SynthesisConfig, delta=None):
  """CE + r_bn·Σ_l w_l·term_l on an augmented view, of the teacher at θ + Δθ (`delta`, None for
  SRe2L); returns (loss, (ce, per-layer terms)).

  A committee (cfg.committee > 1, leading teacher axis on params, batch_stats and delta): each
  teacher's loss, CE and terms on the same view, averaged over the teachers."""

  def one_teacher(params, batch_stats, delta):
    ce, terms = _ce_and_terms(model, params, batch_stats, x_view, labels, bn_paths, cfg, delta)
    return ce + cfg.r_bn * jnp.dot(layer_weights, terms), (ce, terms)

  if cfg.committee == 1:
    return one_teacher(params, batch_stats, delta)
  return jax.tree.map(lambda a: a.mean(0), jax.vmap(one_teacher)(params, batch_stats, delta))


class BatchState(NamedTuple):
  """A synthetic batch between iterations: enough to continue (or checkpoint) it."""
  x: jax.Array                 # current normalised pixels
  adam: Any                    # optax.ScaleByAdamState
  delta: Any                   # Δθ (None for SRe2L)
  first_grad_extra: jax.Array  # quirk Q1's leaked ascent gradient (zeros unless compat_q1)
  t: jax.Array                 # index of the next iteration
  weight_grad_sum: Any = None  # quirk Q2: Σ ∇θ L_total over the iterations so far (else None)
  weights: Any = None          # delta_form 'direct': θ + Δθ, formed once for the whole batch

  def chain(self) -> ChainCarry:
    """The carry into the next class-chunk of this ipc index (compat_q2)."""
    return ChainCarry(self.delta, self.weight_grad_sum)


def _adam(cfg: SynthesisConfig):
  return optax.scale_by_adam(b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps)


def start_batch(model, variables, x_init, labels, key, draws, *, bn_paths,
                cfg: SynthesisConfig, chain: ChainCarry | None = None, unroll: bool = True):
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
    adjust_one = lambda params, batch_stats: directed_weight_adjustment(
        model, params, batch_stats, x_init, view0, labels, bn_paths, cfg, chain, unroll)
    if cfg.committee == 1:
      delta, extra, adjust = adjust_one(params, batch_stats)
    else:  # Δθ per teacher; the ascent's image gradient is zeros (Q1 is refused for committees)
      delta, _, adjust = jax.vmap(adjust_one)(params, batch_stats)
      adjust = jax.tree.map(lambda a: a.mean(0), adjust)
    metrics = {"adjust_ce": adjust["ce"], "adjust_bn_terms": adjust["bn_terms"]}
    if cfg.chained:
      metrics["delta_norm_chunk"] = optax.tree.norm(jax.tree.map(jnp.subtract, delta, chain.delta))
  elif cfg.method == "random":
    random_key = jax.random.split(key, cfg.iterations + 1)[-1]
    if cfg.committee == 1:
      delta = random_weight_adjustment(random_key, params, cfg.rho)
    else:
      delta = jax.vmap(lambda k, p: random_weight_adjustment(k, p, cfg.rho))(
          jax.random.split(random_key, cfg.committee), params)
  if delta is None:
    metrics["delta_norm"] = jnp.zeros((), x_init.dtype)
  else:  # ‖Δθ‖ (a committee's: the mean of each ‖Δθ_m‖), and how much the arithmetic keeps
    metrics["delta_norm"] = (jnp.mean(jax.vmap(optax.tree.norm)(delta)) if cfg.committee > 1
                             else optax.tree.norm(delta))
    metrics.update(arithmetic.survival(params, delta, cfg.weight_bits, cfg.delta_form))
  weight_grad_sum = jax.tree.map(jnp.zeros_like, params) if cfg.chained else None
  # The direct form's θ + Δθ, once per batch rather than in every iteration.
  weights = _add(params, delta) if delta is not None and cfg.delta_form == "direct" else None
  state = BatchState(x_init, _adam(cfg).init(x_init), delta, extra, jnp.zeros((), jnp.int32),
                     weight_grad_sum, weights)
  return state, metrics


def run_iterations(model, variables, state: BatchState, labels, key, draws, num_steps: int, *,
                   bn_paths, pixel_mean, pixel_std, cfg: SynthesisConfig, unroll: bool = False):
  """Iterations state.t .. state.t + num_steps − 1 of Adam on the pixels (clamped after each).

  T iterations in one call or in several chunks compute the same thing (so the recover stage
  can checkpoint inside a batch). `unroll`: see `_loop` (for short blocks). Metrics per
  iteration: `ce`, `bn_terms` (num_steps, L), `grad_norm` (of the gradient Adam received),
  `lr`. Only under compat_q2 are teacher weight gradients computed (summed into
  state.weight_grad_sum), as the official loop does.
  """
  del key  # the draws hold all the randomness of the iterations
  params, batch_stats = variables["params"], variables["batch_stats"]
  draws = as_draws(draws)
  dtype = state.x.dtype
  layer_w = bn_layer_weights(len(bn_paths), cfg.first_bn_weight).astype(dtype)
  lo, hi = pixel_bounds(pixel_mean, pixel_std, dtype)
  adam = _adam(cfg)
  track_weights = state.weight_grad_sum is not None
  # The teacher the iterations run: θ + Δθ formed by start_batch (the direct form), or θ and Δθ
  # (the split form; SRe2L: θ alone). Q2's weight gradients are taken with respect to the
  # perturbed weights or to Δθ: the same values.
  direct = state.weights is not None
  teacher, delta = (state.weights, None) if direct else (params, state.delta)

  def loss_fn(x, teacher, delta, t):
    return synthesis_loss(model, teacher, batch_stats,
                          synthesis_view(x, draws.at(t), cfg.augment), labels, bn_paths, layer_w,
                          cfg, delta)

  argnums = ((0, 1) if direct else (0, 2)) if track_weights else 0
  grad_fn = jax.value_and_grad(loss_fn, argnums=argnums, has_aux=True)

  def step(carry, t):
    x, adam_state, weight_grad_sum = carry
    (_, (ce, terms)), grads = grad_fn(x, teacher, delta, t)
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
  (x, adam_state, weight_grad_sum), metrics = _loop(
      step, (state.x, state.adam, state.weight_grad_sum), steps, unroll)
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


def delta_theta(model, variables, x, labels, offset, *, image_shape, cfg: SynthesisConfig):
  """The DWA adjustment alone, on roll `offset` of `x`, for inspection and tests.

  Returns (Δθ, the ascent's accumulated image gradient (zeros unless cfg.compat_q1), metrics).
  """
  bn_paths = bn_layer_paths(model, variables, image_shape)
  view = lambda x: synthesis_view(x, AugmentDraws(offset), "roll")
  return directed_weight_adjustment(
      model, variables["params"], variables["batch_stats"], x, view, labels, bn_paths, cfg)
