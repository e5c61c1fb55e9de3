"""The teacher's arithmetic: how accelerators read float32 operands, its emulation on any
backend, and how much of DWA's Δθ survives it (docs/scale-out.md, "Δθ and the arithmetic").

Δθ is below the rounding step of the weights in bfloat16 and TF32, so a layer run on θ + Δθ
sees round(θ + Δθ) − round(θ); the split by linearity, layer(x; θ) + layer(x; Δθ)
(synthesis.forward_with_bn_stats, delta_form='split'), sees round(Δθ) ≈ Δθ. `survival`
measures this in weight space, as recorded per batch in recover.json.
"""

import functools

import jax
import jax.numpy as jnp

BFLOAT16_BITS, TF32_BITS = 7, 10
EXACT = None  # float32 read as it is
# recover.emulate: the matrix unit to emulate -> mantissa bits of the operands it reads.
EMULATIONS = {"none": EXACT, "tf32": TF32_BITS, "bfloat16": BFLOAT16_BITS}


def is_kernel_module(subtree) -> bool:
  """A Conv or Dense layer's parameters ({'kernel'[, 'bias']}); BatchNorm's are scale/bias."""
  return isinstance(subtree, dict) and "kernel" in subtree


def map_modules(fn, params):
  """`fn(module_params, is_kernel_module)` over every module's parameter dict."""
  if not isinstance(params, dict) or not params or not all(
      isinstance(v, dict) for v in params.values()):
    return fn(params, is_kernel_module(params))
  return {k: map_modules(fn, v) for k, v in params.items()}


def kernel_mask(params):
  """`params` with each leaf replaced by whether it belongs to a Conv or Dense layer."""
  return map_modules(lambda m, is_kernel: jax.tree.map(lambda _: is_kernel, m), params)


def round_mantissa(a, bits: int):
  """float32 `a` rounded to nearest (ties to even) with `bits` explicit mantissa bits, as an
  accelerator's matmul unit reads it: 7 for bfloat16, 10 for TF32, 23 leaves it as it is."""
  a = jnp.asarray(a, jnp.float32)
  if bits >= 23:
    return a
  shift = 23 - bits
  i = jax.lax.bitcast_convert_type(a, jnp.uint32)
  half = jnp.uint32((1 << (shift - 1)) - 1) + ((i >> shift) & 1)
  return jax.lax.bitcast_convert_type(((i + half) >> shift) << shift, jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def read_as(a, bits: int):
  """`a` as a matrix unit with `bits` mantissa bits reads an operand (`round_mantissa`), with a
  straight-through gradient: the rounding is invisible to the backward pass, whose own operands
  `cotangent_read_as` rounds."""
  return round_mantissa(a, bits).astype(a.dtype)


read_as.defvjp(lambda a, bits: (read_as(a, bits), None), lambda bits, _, g: (g,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def cotangent_read_as(y, bits: int):
  """The identity, whose backward pass reads the incoming cotangent with `bits` mantissa bits:
  placed on a layer's output, the backward products (to the layer's input and weights) read
  their cotangent operand as the matrix unit does."""
  return y


cotangent_read_as.defvjp(lambda y, bits: (y, None),
                         lambda bits, _, g: (round_mantissa(g, bits).astype(g.dtype),))


def matmul_input_bits(platform: str, compute_dtype: str | None = None,
                      compute_capability: str | None = None) -> int | None:
  """Mantissa bits with which the teacher's convolutions and matmuls read float32 operands on
  `platform`: bfloat16 compute, or the TPU's default one bfloat16 pass -> 7; GPUs -> 10 (TF32,
  XLA's default for float32 on Ampere and later), except an NVIDIA GPU of
  `compute_capability` below 8.0 (V100, T4), which has no TF32 and reads float32 exactly; the
  CPU -> None (exact). `jax_default_matmul_precision` = 'highest' (or 'float32') makes every
  platform exact."""
  if compute_dtype == "bfloat16":
    return BFLOAT16_BITS
  if str(jax.config.jax_default_matmul_precision or "").lower() in ("highest", "float32"):
    return EXACT
  if platform in ("gpu", "cuda") and _version(compute_capability) < (8,):
    return EXACT
  return {"tpu": BFLOAT16_BITS, "gpu": TF32_BITS, "cuda": TF32_BITS,
          "rocm": TF32_BITS}.get(platform, EXACT)


def _version(compute_capability) -> tuple:
  """'7.5' -> (7, 5); anything else (None, an AMD 'gfx90a') -> (inf,): not known to be older."""
  try:
    return tuple(int(part) for part in str(compute_capability).split("."))
  except ValueError:
    return (float("inf"),)


def effective_delta(params, delta, bits: int | None, delta_form: str):
  """The perturbation the layers see. Conv/Dense weights read with `bits` mantissa bits:
  round(θ + Δθ) − round(θ) ('direct') or round(Δθ) ('split'); everything else (BatchNorm's
  scale and bias) takes θ + Δθ in float32."""
  rnd = (lambda a: a) if bits is EXACT else (lambda a: round_mantissa(a, bits))

  def one(p, d, is_kernel):
    p, d = p.astype(jnp.float32), d.astype(jnp.float32)
    if not is_kernel:
      return (p + d) - p
    return rnd(d) if delta_form == "split" else rnd(p + d) - rnd(p)

  return jax.tree.map(one, params, delta, kernel_mask(params))


def survival(params, delta, bits: int | None, delta_form: str) -> dict:
  """{'delta_norm_ratio': ‖effective‖ / ‖Δθ‖, 'delta_cosine': cos(effective, Δθ)} over every
  parameter (a committee's leading teacher axis included)."""
  effective = effective_delta(params, delta, bits, delta_form)
  dot = lambda a, b: sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
                         for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  intended, seen = jnp.sqrt(dot(delta, delta)), jnp.sqrt(dot(effective, effective))
  return {"delta_norm_ratio": seen / intended,
          "delta_cosine": dot(effective, delta) / (seen * intended)}
