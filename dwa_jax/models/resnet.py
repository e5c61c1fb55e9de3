"""torchvision ResNets in Flax (NHWC), with the CIFAR stem used by SRe2L/DWA teachers.

Module names follow torchvision (`conv1`, `bn1`, `layer1_0`, `downsample_0`, `fc`), see layers.py.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dwa_jax.models.layers import batch_norm, conv, max_pool_torch


class Block(nn.Module):
  """BasicBlock (two 3x3 convs) or, with `bottleneck`, torchvision's v1.5 Bottleneck (1x1, 3x3
  carrying the stride, 1x1 to 4x the width)."""
  features: int
  stride: int = 1
  downsample: bool = False
  bottleneck: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False, capture_stats: bool = False):
    kw = dict(train=train, capture_stats=capture_stats, dtype=self.dtype)
    width, stride = self.features, self.stride
    if self.bottleneck:
      layers = ((width, 1, 1), (width, 3, stride), (width * 4, 1, 1))
    else:
      layers = ((width, 3, stride), (width, 3, 1))
    out = x
    for k, (features, kernel, layer_stride) in enumerate(layers, 1):
      out = conv(features, kernel, layer_stride, name=f"conv{k}", dtype=self.dtype)(out)
      out = batch_norm(out, name=f"bn{k}", **kw)
      out = nn.relu(out) if k < len(layers) else out
    if self.downsample:
      x = conv(layers[-1][0], 1, stride, pad=0, name="downsample_0", dtype=self.dtype)(x)
      x = batch_norm(x, name="downsample_1", **kw)
    return nn.relu(out + x)


class ResNet(nn.Module):
  """ResNet with an ImageNet stem (7x7/2 conv + max-pool) or a CIFAR stem (3x3/1 conv, no pool)."""
  bottleneck: bool
  stage_sizes: Sequence[int]
  num_classes: int
  cifar_stem: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False, capture_stats: bool = False, features: bool = False):
    """Returns logits, or with `features=True` the last conv feature map (before pooling) too."""
    if self.cifar_stem:
      x = conv(64, 3, 1, name="conv1", dtype=self.dtype)(x)
    else:
      x = conv(64, 7, 2, pad=3, name="conv1", dtype=self.dtype)(x)
    x = nn.relu(batch_norm(x, name="bn1", train=train, capture_stats=capture_stats,
                           dtype=self.dtype))
    if not self.cifar_stem:
      x = max_pool_torch(x, 3, 2, 1)
    expansion = 4 if self.bottleneck else 1
    for i, num_blocks in enumerate(self.stage_sizes):
      width = 64 * 2**i
      for j in range(num_blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        downsample = j == 0 and (stride != 1 or x.shape[-1] != width * expansion)
        x = Block(width, stride, downsample, self.bottleneck, dtype=self.dtype,
                  name=f"layer{i + 1}_{j}")(x, train=train, capture_stats=capture_stats)
    feature_map = x
    x = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, name="fc", dtype=self.dtype)(x)
    return (logits, feature_map) if features else logits


# depth -> (bottleneck blocks, blocks per stage)
STAGES = {18: (False, (2, 2, 2, 2)), 34: (False, (3, 4, 6, 3)),
          50: (True, (3, 4, 6, 3)), 101: (True, (3, 4, 23, 3))}


def resnet(depth: int, num_classes: int, cifar_stem: bool = False, dtype: Any = None) -> ResNet:
  bottleneck, stages = STAGES[depth]
  return ResNet(bottleneck, stages, num_classes, cifar_stem, dtype)
