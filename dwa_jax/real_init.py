"""Teacher-scored real initialisation (RDED's selector, Sun et al., CVPR 2024), a starting point
for DWA and SRe2L (`recover.init='scored'`).

The rule, for the synthetic image of class c at ipc index i (seeded, a function of (seed, i, c)
alone, so it does not depend on devices, processes or which other batches exist):
  1. candidates: `init_candidates` training images of class c, rows i·n … i·n + n − 1 of
     `data.sample_per_class(train, ipc · n, seed)` (disjoint between ipc indices; with n = 1
     the images of the plain real initialisation);
  2. crops: `init_crops` RandomResizedCrop boxes per candidate (torchvision's rule, area
     fraction in [init_min_scale, 1], aspect ratio in [3/4, 4/3]), each resized back to the
     full image size (bilinear), drawn from fold_in(key(seed), i, c);
  3. score: the teacher's cross-entropy for class c on each crop (eval mode, the teacher's
     normalisation);
  4. pick: the crop at `init_quantile` of the scores sorted ascending (index
     round(q · (count − 1))): 0 is the crop the teacher finds easiest (RDED's choice), 1 the
     hardest.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dwa_jax import augment, data

SCORE_TAG = 0x5C0  # separates the crop draws from the batch's other streams


@dataclasses.dataclass(frozen=True)
class ScoredInit:
  candidates: int = 5
  crops: int = 5
  min_scale: float = 0.5
  quantile: float = 0.0

  @classmethod
  def from_config(cls, rc) -> "ScoredInit":
    return cls(rc.init_candidates, rc.init_crops, rc.init_min_scale, rc.init_quantile)


def candidate_rows(dataset, ipc: int, candidates: int, seed: int) -> np.ndarray:
  """(ipc, candidates, num_classes) training-image indices (rule step 1)."""
  rows = data.sample_per_class(dataset, ipc * candidates, seed)
  return rows.reshape(ipc, candidates, dataset.num_classes)


def crop_key(seed: int, ipc_index: int, label: int):
  key = jax.random.fold_in(jax.random.key(seed), SCORE_TAG)
  return jax.random.fold_in(jax.random.fold_in(key, ipc_index), label)


def make_scorer(model, variables, mean, std, cfg: ScoredInit):
  """score(images (n, H, W, C) uint8, label, key) -> (the chosen crop, normalised (H, W, C);
  the cross-entropy of every crop; the chosen crop's index): rule steps 2-4, one jitted
  program per candidate count and image size."""
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

  @jax.jit
  def score(images, label, key):
    n, height, width, _ = images.shape
    if height != width:
      raise ValueError(f"recover.init='scored' needs square images, got {height}x{width}")
    boxes = jax.vmap(lambda k: augment.sample_crop_box(k, height, width, (cfg.min_scale, 1.0)))(
        jax.random.split(key, n * cfg.crops))
    sources = jnp.repeat(images.astype(jnp.float32) / 255.0, cfg.crops, axis=0)
    crops = jax.vmap(lambda image, *box: augment.resized_crop(image, box, height))(sources,
                                                                                     *boxes)
    crops = (crops - mean) / std
    logits = model.apply(variables, crops, train=False)
    ce = -jax.nn.log_softmax(logits)[:, label]
    rank = int(round(cfg.quantile * (n * cfg.crops - 1)))
    chosen = jnp.argsort(ce)[rank]
    return crops[chosen], ce, chosen

  return score
