"""torchvision ShuffleNetV2 x1.0 in Flax (NHWC).

Names: `conv1_0`/`conv1_1` <-> `conv1.0`/`conv1.1`, `stage2_0` / `branch1_0` <->
`stage2.0.branch1.0`, `conv5_0`, `fc` (layers.py rule).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dwa_jax.models.layers import batch_norm, conv, conv_bn, max_pool_torch

STAGE_REPEATS = (4, 8, 4)
STAGE_CHANNELS = (24, 116, 232, 464, 1024)  # x1.0: stem, stage2-4, conv5


def channel_shuffle(x, groups: int):
  """torch's view(b, g, c/g, h, w).transpose(1, 2): channel k*g + j <- j*(c/g) + k, in NHWC."""
  *lead, c = x.shape
  x = x.reshape(*lead, groups, c // groups)
  return jnp.swapaxes(x, -1, -2).reshape(*lead, c)


class InvertedResidual(nn.Module):
  """Stride 1: split channels, transform one half (branch2). Stride 2: both branches see x.

  Branch layers keep torch's Sequential indices (ReLUs count): branch1 = dw 3x3 [0], BN [1],
  1x1 [2], BN [3]; branch2 = 1x1 [0], BN [1], dw 3x3 [3], BN [4], 1x1 [5], BN [6].
  """
  features: int
  stride: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False, capture_stats: bool = False):
    half = self.features // 2
    bn = lambda y, name: batch_norm(y, name=name, train=train, capture_stats=capture_stats,
                                    dtype=self.dtype)
    pointwise = lambda y, name: conv(half, 1, name=name, dtype=self.dtype)(y)
    depthwise = lambda y, name: conv(y.shape[-1], 3, self.stride, groups=y.shape[-1], name=name,
                                     dtype=self.dtype)(y)
    if self.stride == 1:
      left, right = jnp.split(x, 2, axis=-1)
    else:
      left = bn(depthwise(x, "branch1_0"), "branch1_1")
      left = nn.relu(bn(pointwise(left, "branch1_2"), "branch1_3"))
      right = x
    right = nn.relu(bn(pointwise(right, "branch2_0"), "branch2_1"))
    right = bn(depthwise(right, "branch2_3"), "branch2_4")
    right = nn.relu(bn(pointwise(right, "branch2_5"), "branch2_6"))
    return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(nn.Module):
  num_classes: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False, capture_stats: bool = False, features: bool = False):
    kw = dict(train=train, capture_stats=capture_stats, dtype=self.dtype)
    x = conv_bn(x, STAGE_CHANNELS[0], 3, 2, name="conv1", act=nn.relu, **kw)
    x = max_pool_torch(x, 3, 2, 1)
    for stage, (repeats, width) in enumerate(zip(STAGE_REPEATS, STAGE_CHANNELS[1:4])):
      for j in range(repeats):
        x = InvertedResidual(width, 2 if j == 0 else 1, dtype=self.dtype,
                             name=f"stage{stage + 2}_{j}")(x, train=train,
                                                             capture_stats=capture_stats)
    x = conv_bn(x, STAGE_CHANNELS[4], 1, name="conv5", act=nn.relu, **kw)
    feature_map = x
    logits = nn.Dense(self.num_classes, name="fc", dtype=self.dtype)(jnp.mean(x, axis=(1, 2)))
    return (logits, feature_map) if features else logits
