"""Augmentations: properties that pin down each transform, under jit."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwa_jax import augment


@pytest.fixture
def images():
  return jax.random.uniform(jax.random.key(0), (6, 8, 8, 3)) + 0.5  # > 0, so padding shows


def test_crop_with_padding_is_a_window_of_the_padded_image(images):
  out = jax.jit(augment.random_crop_with_padding, static_argnums=2)(jax.random.key(1), images, 2)
  assert out.shape == images.shape
  padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
  for k in range(6):
    windows = [padded[k, i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
    assert any(np.array_equal(out[k], w) for w in windows)


def test_flip_is_an_exact_mirror_per_example_or_shared(images):
  out = np.asarray(jax.jit(augment.random_flip)(jax.random.key(3), images))
  flipped = [np.array_equal(o, x[:, ::-1]) for o, x in zip(out, np.asarray(images))]
  kept = [np.array_equal(o, x) for o, x in zip(out, np.asarray(images))]
  assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
  shared = np.asarray(augment.random_flip(jax.random.key(3), images, per_example=False))
  decisions = {np.array_equal(o, x) for o, x in zip(shared, np.asarray(images))}
  assert len(decisions) == 1


def test_resized_crop_of_the_full_image_is_identity(images):
  out = augment.random_resized_crop(jax.random.key(0), images, 8, scale=(1.0, 1.0),
                                    ratio=(1.0, 1.0))
  np.testing.assert_allclose(out, images, atol=1e-5)


def _torchvision_crop_box(rng, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision's RandomResizedCrop.get_params, ported line by line to numpy's generator."""
  area = height * width
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
  return (height - height) // 2, (width - width) // 2, height, width  # square: ratio fits


def _ks(a, b) -> float:
  """The two-sample Kolmogorov-Smirnov statistic."""
  grid = np.sort(np.concatenate([a, b]))
  cdf = lambda v: np.searchsorted(np.sort(v), grid, side="right") / len(v)
  return float(np.abs(cdf(a) - cdf(b)).max())


def test_crop_box_follows_torchvision_distribution():
  """Over 2,000 keys at 224 x 224: every box inside the image, area 8-100 % and aspect ratio
  3/4-4/3 (up to the rounding of h and w), and the area fraction, log aspect ratio and
  relative position distributed as an independent numpy port of torchvision's sampler draws
  them (two-sample KS statistic below 0.062, the 0.1 % critical value at these sizes). A
  sampler that always returns the whole image, or a fixed ratio, fails."""
  n, size = 2000, 224
  boxes = np.asarray(jax.jit(jax.vmap(lambda k: jnp.stack(augment.sample_crop_box(k, size, size))))(
      jax.random.split(jax.random.key(0), n)))
  rng = np.random.default_rng(0)
  reference = np.asarray([_torchvision_crop_box(rng, size, size) for _ in range(n)])
  stats = {}
  for name, b in (("ours", boxes), ("torchvision", reference)):
    top, left, h, w = b.T.astype(np.float64)
    assert np.all((top >= 0) & (left >= 0) & (top + h <= size) & (left + w <= size))
    stats[name] = {"area": h * w / size**2, "log_ratio": np.log(w / h),
                   "top": top / np.maximum(size - h, 1), "left": left / np.maximum(size - w, 1)}
  ours = stats["ours"]
  assert ours["area"].min() >= 0.08 * 0.97 and ours["area"].max() <= 1
  assert np.abs(ours["log_ratio"]).max() <= math.log(4 / 3) + 0.02
  assert np.ptp(ours["area"]) > 0.8 and np.ptp(ours["log_ratio"]) > 0.5
  for key in ours:
    assert _ks(ours[key], stats["torchvision"][key]) < 0.062, key


def test_shared_box_gives_the_same_crop_for_identical_images():
  one = jax.random.uniform(jax.random.key(5), (1, 16, 16, 3))
  batch = jnp.repeat(one, 4, axis=0)
  out = jax.jit(augment.random_resized_crop, static_argnums=2,
                static_argnames="per_example")(jax.random.key(2), batch, 16, per_example=False)
  for k in range(1, 4):
    np.testing.assert_array_equal(out[k], out[0])
  per = augment.random_resized_crop(jax.random.key(2), batch, 16, per_example=True)
  assert not all(np.allclose(per[k], per[0]) for k in range(1, 4))


def test_mixup_is_a_convex_combination(images):
  mixed, perm, lam = jax.jit(augment.mixup)(jax.random.key(4), images)
  assert 0 <= float(lam) <= 1
  np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[perm], rtol=1e-6)
  assert sorted(np.asarray(perm).tolist()) == list(range(6))


def test_cutmix_lambda_is_the_unchanged_pixel_fraction():
  x = jnp.arange(4, dtype=jnp.float32)[:, None, None, None] * jnp.ones((4, 16, 16, 1))
  for seed in range(10):
    mixed, perm, lam = jax.jit(augment.cutmix)(jax.random.key(seed), x)
    same = np.asarray(mixed == x)[..., 0]
    moved = np.asarray(perm) != np.arange(4)
    for k in np.flatnonzero(moved):
      np.testing.assert_allclose(same[k].mean(), lam, atol=1e-6)
      np.testing.assert_array_equal(np.asarray(mixed)[k][~same[k]], np.asarray(x)[perm[k]][~same[k]])


def _torch_bilinear_upsample(x, out):
  """torch.nn.functional.interpolate(mode='bilinear', align_corners=False) along axis 0 of a
  numpy array, written from its formula: src = (dst + ½)·in/out − ½, clamped at 0."""
  n = x.shape[0]
  rows = []
  for d in range(out):
    src = max((d + 0.5) * n / out - 0.5, 0.0)
    i0 = min(int(np.floor(src)), n - 1)
    i1 = min(i0 + 1, n - 1)
    rows.append((1 - (src - i0)) * x[i0] + (src - i0) * x[i1])
  return np.stack(rows)


def test_crop_and_resize_weighs_only_the_box_and_matches_torch_formula():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 12, 12, 3))
  top, left, h, w = 3, 2, 5, 7
  poisoned = np.full_like(x, 1e30)
  poisoned[:, top:top + h, left:left + w] = x[:, top:top + h, left:left + w]
  with jax.enable_x64(True):
    out = np.asarray(jax.jit(augment.crop_and_resize, static_argnums=2)(
        jnp.asarray(poisoned), jnp.array([top, left, h, w]), 12))
  assert np.abs(out).max() < 100  # every pixel outside the box has weight zero
  box = x[:, top:top + h, left:left + w]
  expected = np.stack([_torch_bilinear_upsample(_torch_bilinear_upsample(b, 12).swapaxes(0, 1),
                                                12).swapaxes(0, 1) for b in box])
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


def test_crop_and_resize_of_the_whole_image_is_exact_identity():
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
  np.testing.assert_array_equal(augment.crop_and_resize(x, (0, 0, 9, 9), 9), x)



def _primitives(jaxpr) -> set:
  """Every primitive of `jaxpr`, the jaxprs nested in its equations included."""
  found = set()
  for e in jaxpr.eqns:
    found.add(e.primitive.name)
    for value in e.params.values():
      inner = getattr(value, "jaxpr", value)
      if hasattr(inner, "eqns"):
        found |= _primitives(inner)
  return found


def test_the_synthesis_view_backward_has_no_scatter_add():
  """The backward pass of the augmentation synthesis differentiates (crop, resize, flip, roll;
  alone and batched by vmap, as the recover stage runs it) holds no scatter-add, whose order
  of additions into one element, and so its bits, varies from run to run on a GPU: the
  bilinear resize is a product with an interpolation matrix, and what remains of the crop and
  roll under vmap is a scatter that writes each window once."""
  from dwa_jax import synthesis  # pylint: disable=g-import-not-at-top
  cfg = synthesis.SynthesisConfig(augment="crop_flip_roll", iterations=3)
  draws = synthesis.draw_augmentation(jax.random.key(0), 3, cfg, (16, 16))
  stacked = jax.tree.map(lambda a: jnp.stack([a, a]), draws)
  loss = lambda x, d: jnp.sum(synthesis.synthesis_view(x, d.at(1), cfg.augment) ** 2)
  for program, args in ((jax.grad(loss), (jnp.ones((4, 16, 16, 3)), draws)),
                        (jax.vmap(jax.grad(loss)), (jnp.ones((2, 4, 16, 16, 3)), stacked))):
    primitives = _primitives(jax.make_jaxpr(program)(*args).jaxpr)
    assert "dot_general" in primitives  # the resize's product
    assert not {"scatter-add", "scatter_add", "scatter-mul"} & primitives, primitives
