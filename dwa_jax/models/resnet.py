"""torchvision ResNets in Flax (NHWC), with the CIFAR stem used by SRe2L/DWA teachers.

Module names follow torchvision (`conv1`, `bn1`, `layer1_0`, `downsample_0`, `fc`), see layers.py.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dwa_jax.models.layers import BatchNorm, conv, max_pool_torch


class BasicBlock(nn.Module):
  features: int
  stride: int = 1
  downsample: bool = False
  dtype: Any = None
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool = False, capture_stats: bool = False):
    bn = lambda name: BatchNorm(use_running_average=not train, name=name, dtype=self.dtype)
    out = conv(self.features, 3, self.stride, name="conv1", dtype=self.dtype)(x)
    out = nn.relu(bn("bn1")(out, capture_stats=capture_stats))
    out = conv(self.features, 3, 1, name="conv2", dtype=self.dtype)(out)
    out = bn("bn2")(out, capture_stats=capture_stats)
    if self.downsample:
      x = conv(self.features, 1, self.stride, pad=0, name="downsample_0", dtype=self.dtype)(x)
      x = bn("downsample_1")(x, capture_stats=capture_stats)
    return nn.relu(out + x)


class Bottleneck(nn.Module):
  """torchvision v1.5 bottleneck: the stride sits on the 3x3 conv."""
  features: int
  stride: int = 1
  downsample: bool = False
  dtype: Any = None
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = False, capture_stats: bool = False):
    bn = lambda name: BatchNorm(use_running_average=not train, name=name, dtype=self.dtype)
    out = conv(self.features, 1, 1, pad=0, name="conv1", dtype=self.dtype)(x)
    out = nn.relu(bn("bn1")(out, capture_stats=capture_stats))
    out = conv(self.features, 3, self.stride, name="conv2", dtype=self.dtype)(out)
    out = nn.relu(bn("bn2")(out, capture_stats=capture_stats))
    out = conv(self.features * 4, 1, 1, pad=0, name="conv3", dtype=self.dtype)(out)
    out = bn("bn3")(out, capture_stats=capture_stats)
    if self.downsample:
      x = conv(self.features * 4, 1, self.stride, pad=0, name="downsample_0", dtype=self.dtype)(x)
      x = bn("downsample_1")(x, capture_stats=capture_stats)
    return nn.relu(out + x)


class ResNet(nn.Module):
  """ResNet with an ImageNet stem (7x7/2 conv + max-pool) or a CIFAR stem (3x3/1 conv, no pool)."""
  block: Any
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
    x = BatchNorm(use_running_average=not train, name="bn1", dtype=self.dtype)(
        x, capture_stats=capture_stats)
    x = nn.relu(x)
    if not self.cifar_stem:
      x = max_pool_torch(x, 3, 2, 1)
    in_features = 64
    for i, num_blocks in enumerate(self.stage_sizes):
      width = 64 * 2**i
      for j in range(num_blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        downsample = j == 0 and (stride != 1 or in_features != width * self.block.expansion)
        x = self.block(width, stride, downsample, dtype=self.dtype, name=f"layer{i + 1}_{j}")(
            x, train=train, capture_stats=capture_stats)
        in_features = width * self.block.expansion
    feature_map = x
    x = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, name="fc", dtype=self.dtype)(x)
    return (logits, feature_map) if features else logits


STAGES = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
          50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3))}


def resnet(depth: int, num_classes: int, cifar_stem: bool = False, dtype: Any = None) -> ResNet:
  block, stages = STAGES[depth]
  return ResNet(block, stages, num_classes, cifar_stem, dtype)
