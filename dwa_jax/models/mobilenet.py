"""torchvision MobileNetV2 (width 1.0) in Flax (NHWC).

Module names follow torchvision's nested Sequentials through the layers.py rule: `features_0_0`
<-> `features.0.0`, `features_1` / `conv_0_1` <-> `features.1.conv.0.1`, `classifier_1`.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dwa_jax.models.layers import batch_norm, conv, conv_bn, dropout

# (expand ratio t, output channels c, repeats n, first stride s), torchvision's table.
SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
           (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
  """1x1 expand (skipped when t = 1), 3x3 depthwise, linear 1x1 projection; residual if shapes
  allow. Layers are `conv_<i>` in torch order, so the indices shift when there is no expansion."""
  features: int
  stride: int
  expand_ratio: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False, capture_stats: bool = False):
    kw = dict(train=train, capture_stats=capture_stats, dtype=self.dtype)
    hidden = int(round(x.shape[-1] * self.expand_ratio))
    out, i = x, 0
    if self.expand_ratio != 1:
      out = conv_bn(out, hidden, 1, name="conv_0", act=nn.relu6, **kw)
      i = 1
    out = conv_bn(out, hidden, 3, self.stride, name=f"conv_{i}", groups=hidden, act=nn.relu6, **kw)
    out = conv(self.features, 1, name=f"conv_{i + 1}", dtype=self.dtype)(out)
    out = batch_norm(out, name=f"conv_{i + 2}", **kw)
    return x + out if self.stride == 1 and x.shape[-1] == self.features else out


class MobileNetV2(nn.Module):
  """Dropout 0.2 before the classifier, active only with a 'dropout' PRNG (layers.dropout)."""
  num_classes: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False, capture_stats: bool = False, features: bool = False):
    kw = dict(train=train, capture_stats=capture_stats, dtype=self.dtype)
    x = conv_bn(x, 32, 3, 2, name="features_0", act=nn.relu6, **kw)
    index = 1
    for t, c, n, s in SETTING:
      for j in range(n):
        x = InvertedResidual(c, s if j == 0 else 1, t, dtype=self.dtype, name=f"features_{index}")(
            x, train=train, capture_stats=capture_stats)
        index += 1
    x = conv_bn(x, 1280, 1, name=f"features_{index}", act=nn.relu6, **kw)
    feature_map = x
    x = dropout(self, jnp.mean(x, axis=(1, 2)), 0.2, train)
    # torchvision initialises the classifier with N(0, 0.01).
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                      name="classifier_1", dtype=self.dtype)(x)
    return (logits, feature_map) if features else logits
