"""torchvision EfficientNet-B0 in Flax (NHWC).

Names: `features_0_0` <-> `features.0.0`, block `features_<stage>_<i>` with `block_<j>_0/1`
(conv, BN) and the squeeze-excitation `block_<j>` (`fc1`, `fc2`), `classifier_1`.

Stochastic depth (torchvision's per-block rate 0.2 * block index / 16, row mode) and the
classifier's 0.2 dropout run only in training with a 'dropout' PRNG (`layers.dropout`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dwa_jax.models.layers import conv, conv_bn, dropout

# (expand ratio, kernel, first stride, output channels, repeats): torchvision's B0 table.
SETTING = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
           (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
STOCHASTIC_DEPTH = 0.2


def drop_rows(key, x, rate: float):
  """torchvision StochasticDepth(mode='row'): zero whole samples, rescale the survivors."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


class SqueezeExcitation(nn.Module):
  squeeze: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.silu(conv(self.squeeze, 1, bias=True, name="fc1", dtype=self.dtype)(s))
    s = conv(x.shape[-1], 1, bias=True, name="fc2", dtype=self.dtype)(s)
    return x * nn.sigmoid(s)


class MBConv(nn.Module):
  """1x1 expand (skipped when the ratio is 1), depthwise kxk, SE, linear 1x1 projection."""
  features: int
  kernel: int
  stride: int
  expand_ratio: int
  drop_rate: float = 0.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False, capture_stats: bool = False):
    kw = dict(train=train, capture_stats=capture_stats, dtype=self.dtype)
    in_features = x.shape[-1]
    hidden = in_features * self.expand_ratio
    out, j = x, 0
    if hidden != in_features:
      out = conv_bn(out, hidden, 1, name="block_0", act=nn.silu, **kw)
      j = 1
    out = conv_bn(out, hidden, self.kernel, self.stride, name=f"block_{j}", groups=hidden,
                  act=nn.silu, **kw)
    out = SqueezeExcitation(max(1, in_features // 4), dtype=self.dtype, name=f"block_{j + 1}")(out)
    out = conv_bn(out, self.features, 1, name=f"block_{j + 2}", **kw)
    if self.stride != 1 or in_features != self.features:
      return out
    if train and self.drop_rate > 0 and self.has_rng("dropout"):
      out = drop_rows(self.make_rng("dropout"), out, self.drop_rate)
    return x + out


class EfficientNetB0(nn.Module):
  num_classes: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False, capture_stats: bool = False, features: bool = False):
    kw = dict(train=train, capture_stats=capture_stats, dtype=self.dtype)
    x = conv_bn(x, 32, 3, 2, name="features_0", act=nn.silu, **kw)
    total = sum(s[-1] for s in SETTING)
    block = 0
    for stage, (t, k, s, c, n) in enumerate(SETTING):
      for i in range(n):
        x = MBConv(c, k, s if i == 0 else 1, t, STOCHASTIC_DEPTH * block / total,
                   dtype=self.dtype, name=f"features_{stage + 1}_{i}")(
                       x, train=train, capture_stats=capture_stats)
        block += 1
    x = conv_bn(x, 4 * SETTING[-1][3], 1, name=f"features_{len(SETTING) + 1}", act=nn.silu, **kw)
    feature_map = x
    x = dropout(self, jnp.mean(x, axis=(1, 2)), 0.2, train)
    # torchvision: uniform(-1/sqrt(out), 1/sqrt(out)) weights, zero bias.
    bound = 1.0 / self.num_classes**0.5
    init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
    logits = nn.Dense(self.num_classes, kernel_init=init, name="classifier_1",
                      dtype=self.dtype)(x)
    return (logits, feature_map) if features else logits
