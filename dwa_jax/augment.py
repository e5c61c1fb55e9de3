"""Jit-compatible batch augmentations of NHWC float images (static shapes, traced boxes)."""

import math

import jax
import jax.numpy as jnp


def random_crop_with_padding(key, x, pad: int = 4):
  """torchvision RandomCrop(size, padding=pad): zero-pad, then a random window per example."""
  n, h, w, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = jax.random.randint(key, (n, 2), 0, 2 * pad + 1)
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


def random_flip(key, x, per_example: bool = True):
  """Horizontal flip with probability ½, per example or one decision for the whole batch."""
  flip = jax.random.bernoulli(key, 0.5, (x.shape[0] if per_example else 1,))
  flip = jnp.broadcast_to(flip, (x.shape[0],))[:, None, None, None]
  return jnp.where(flip, x[:, :, ::-1, :], x)


def sample_crop_box(key, height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision RandomResizedCrop.get_params: 10 tries of an area/log-ratio draw that fits,
  else a centre crop of the clamped ratio. Returns (top, left, h, w) as traced ints."""
  area = height * width
  area_key, ratio_key, top_key, left_key = jax.random.split(key, 4)
  target = area * jax.random.uniform(area_key, (10,), minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(ratio_key, (10,), minval=math.log(ratio[0]),
                                      maxval=math.log(ratio[1])))
  ws = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
  hs = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
  fits = (ws > 0) & (hs > 0) & (ws <= width) & (hs <= height)
  first = jnp.argmax(fits)
  # Fallback: the whole image cropped to the nearest allowed aspect ratio, centred.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    fw, fh = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    fw, fh = int(round(height * ratio[1])), height
  else:
    fw, fh = width, height
  h = jnp.where(fits.any(), hs[first], fh)
  w = jnp.where(fits.any(), ws[first], fw)
  top = jnp.where(fits.any(), jax.random.randint(top_key, (), 0, height - h + 1), (height - fh) // 2)
  left = jnp.where(fits.any(), jax.random.randint(left_key, (), 0, width - w + 1), (width - fw) // 2)
  return top, left, h, w


def _resize_axis(x, start, length, out_size: int, axis: int):
  """Bilinear resize of x[start:start+length] along `axis` (1 or 2 of NHWC) to out_size,
  half-pixel centres, as torch's `interpolate(mode='bilinear', align_corners=False)`; pixels
  outside the window have weight zero. For upsampling (length ≤ out_size, all the augmentations
  here produce) it is also torchvision's antialiased resize; downsampling would need a wider,
  antialiasing window.

  Written as a product with an (out_size, size) interpolation matrix, in full float32
  precision: its backward pass is a product too, where an indexed read's would be a
  scatter-add, whose order of additions (and so its bits) varies from run to run on a GPU.
  """
  dtype = x.dtype
  scale = jnp.asarray(length, dtype) / out_size
  src = jnp.maximum((jnp.arange(out_size, dtype=dtype) + 0.5) * scale - 0.5, 0)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), length - 1)
  i1 = jnp.minimum(i0 + 1, length - 1)
  w1 = (src - i0.astype(dtype))[:, None]
  rows = jnp.arange(x.shape[axis])[None, :]
  weights = ((1 - w1) * (rows == start + i0[:, None]).astype(dtype)
             + w1 * (rows == start + i1[:, None]).astype(dtype))
  spec = {1: "nhwc,oh->nowc", 2: "nhwc,ow->nhoc"}[axis]
  return jnp.einsum(spec, x, weights, precision=jax.lax.Precision.HIGHEST)


def crop_and_resize(x, box, out_size: int):
  """torchvision's `resized_crop` on a tensor: crop the box (top, left, h, w) of NHWC images
  (one box for the batch), then bilinear-resize it to out_size² (see `_resize_axis`)."""
  top, left, h, w = (jnp.asarray(v, jnp.int32) for v in box)
  x = _resize_axis(x, top, h, out_size, axis=1)
  return _resize_axis(x, left, w, out_size, axis=2)


def resized_crop(image, box, out_size: int):
  """`crop_and_resize` of one HWC image."""
  return crop_and_resize(image[None], box, out_size)[0]


def random_resized_crop(key, x, out_size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        per_example: bool = True):
  """RandomResizedCrop; per_example=False uses ONE box for the whole batch, as the official
  SRe2L/DWA synthesis applies the transform to the batch tensor."""
  n, height, width, _ = x.shape
  if not per_example:
    return crop_and_resize(x, sample_crop_box(key, height, width, scale, ratio), out_size)
  boxes = jax.vmap(lambda k: sample_crop_box(k, height, width, scale, ratio))(
      jax.random.split(key, n))
  return jax.vmap(lambda img, *b: resized_crop(img, b, out_size))(x, *boxes)


def mixup(key, x, alpha: float = 0.8):
  """λ·x + (1−λ)·x[perm], λ ~ Beta(α, α) once per batch. Returns (mixed, perm, λ)."""
  lam_key, perm_key = jax.random.split(key)
  lam = jax.random.beta(lam_key, alpha, alpha).astype(x.dtype)
  perm = jax.random.permutation(perm_key, x.shape[0])
  return lam * x + (1 - lam) * x[perm], perm, lam


def cutmix(key, x, alpha: float = 1.0):
  """Pastes a box of x[perm] into x (Yun et al. 2019). Returns (mixed, perm, λ) with λ the
  fraction of pixels kept from x after clipping the box to the image."""
  lam_key, perm_key, cy_key, cx_key = jax.random.split(key, 4)
  n, h, w, _ = x.shape
  lam = jax.random.beta(lam_key, alpha, alpha)
  perm = jax.random.permutation(perm_key, n)
  cut = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (cut * h).astype(jnp.int32), (cut * w).astype(jnp.int32)
  cy, cx = jax.random.randint(cy_key, (), 0, h), jax.random.randint(cx_key, (), 0, w)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  mixed = jnp.where(inside[None, :, :, None], x[perm], x)
  kept = 1.0 - ((y1 - y0) * (x1 - x0)) / (h * w)
  return mixed, perm, kept.astype(x.dtype)
