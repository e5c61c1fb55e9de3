"""Augmentations: properties that pin down each transform, under jit."""

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


def test_crop_box_follows_torchvision_bounds():
  for seed in range(50):
    top, left, h, w = (int(v) for v in augment.sample_crop_box(jax.random.key(seed), 32, 32))
    assert 0 <= top <= 32 - h and 0 <= left <= 32 - w and h >= 1 and w >= 1
    assert 0.08 * 1024 * 0.9 <= h * w <= 1024


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
