"""The dataset-distillation ConvNet with BatchNorm (`ConvNetW128`, depth 3 in the DWA paper).

Same layer indices as the reference torch `nn.Sequential` (conv, norm, relu, avg-pool per depth),
so `features_0` <-> `features.0`; the classifier flattens in torch's (C, H, W) order so that
imported weights need no permutation.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dwa_jax.models.layers import batch_norm, conv


class ConvNet(nn.Module):
  num_classes: int
  width: int = 128
  depth: int = 3
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False, capture_stats: bool = False, features: bool = False):
    for d in range(self.depth):
      # The reference pads the first conv by 3 on 1-channel (MNIST-like) inputs.
      pad = 3 if (d == 0 and x.shape[-1] == 1) else 1
      x = conv(self.width, 3, 1, pad=pad, bias=True, name=f"features_{4 * d}", dtype=self.dtype)(x)
      x = nn.relu(batch_norm(x, name=f"features_{4 * d + 1}", train=train,
                             capture_stats=capture_stats, dtype=self.dtype))
      if d == self.depth - 1:
        feature_map = x
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    flat = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    logits = nn.Dense(self.num_classes, name="classifier", dtype=self.dtype)(flat)
    return (logits, feature_map) if features else logits
