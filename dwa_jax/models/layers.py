"""Layers with PyTorch semantics, so torchvision weights and recipes carry over exactly.

Naming convention shared by every model in `dwa_jax.models` (the torch importer relies on it):
a Flax module path maps to a torchvision state-dict prefix by joining path components with '.'
and turning the trailing `_<int>` groups of a component into `.<int>` (`layer1_0` -> `layer1.0`,
`downsample_1` -> `downsample.1`, `features_1_0` -> `features.1.0`, `conv_0_1` -> `conv.0.1`), so
nested torch `Sequential`s need no nested Flax modules. Leaves map as
conv `kernel` (HWIO) <-> `weight` (OIHW), dense `kernel` (in, out) <-> `weight` (out, in),
BatchNorm `scale`/`bias` <-> `weight`/`bias`, batch_stats `mean`/`var` <-> `running_mean`/`running_var`.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Name of the collection BatchNorm layers sow their INPUT statistics into when asked.
BN_STATS = "bn_input_stats"


def channel_mean_var(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and biased variance over all but the last axis (two-pass, like torch)."""
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axis=axes)
  var = jnp.mean(jnp.square(x - mean), axis=axes)
  return mean, var


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm2d: eps 1e-5, momentum 0.1, running_var updated with the unbiased variance.

  With `capture_stats=True` in the module call, the per-channel mean and biased variance of the
  layer's input are sown into the `bn_input_stats` collection (the quantity SRe2L/DWA match).
  """
  use_running_average: bool | None = None  # given here or at call time; eval mode if neither
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, capture_stats: bool = False):
    if self.use_running_average is not None and use_running_average is not None:
      raise ValueError("use_running_average given both to the constructor and at call time.")
    use_ra = next((v for v in (use_running_average, self.use_running_average) if v is not None),
                  True)
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)

    if capture_stats or not use_ra:
      # Statistics in at least float32, also under bfloat16 compute (mixed precision).
      mean, var = channel_mean_var(x.astype(jnp.promote_types(x.dtype, jnp.float32)))
    if capture_stats:
      self.sow(BN_STATS, "mean_var", (mean, var))
    if use_ra:
      mean, var = ra_mean.value, ra_var.value
    elif not self.is_initializing():
      n = x.size // features
      unbiased = var * (n / max(n - 1, 1))
      m = self.momentum
      ra_mean.value = (1 - m) * ra_mean.value + m * jax.lax.stop_gradient(mean)
      ra_var.value = (1 - m) * ra_var.value + m * jax.lax.stop_gradient(unbiased)
    inv = jax.lax.rsqrt(var + self.epsilon) * scale
    # Normalised in (at least) float32, returned in the input's dtype so that bfloat16
    # activations stay bfloat16 for the next convolution (float32 and float64: unchanged).
    return ((x - mean) * inv + bias).astype(x.dtype)


def torch_padding(pad: int) -> Sequence[tuple[int, int]]:
  """Explicit symmetric padding as torch uses it (Flax 'SAME' pads asymmetrically for stride 2)."""
  return ((pad, pad), (pad, pad))


def conv(features: int, kernel: int, stride: int = 1, pad: int | None = None, bias: bool = False,
         groups: int = 1, name: str | None = None, dtype: Any = None) -> nn.Conv:
  """A torch-style Conv2d: explicit padding (kernel // 2 by default), no bias unless asked,
  initialised like torchvision's ResNet (kaiming normal, fan_out, relu gain)."""
  pad = kernel // 2 if pad is None else pad
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=torch_padding(pad),
                 use_bias=bias, feature_group_count=groups, name=name, dtype=dtype,
                 kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))


def max_pool_torch(x, window: int, stride: int, pad: int):
  """torch MaxPool2d with -inf padding."""
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding=torch_padding(pad))


def batch_norm(x, *, name: str, train: bool, capture_stats: bool, dtype: Any = None):
  """BatchNorm `name` (batch statistics when `train`), called inside a compact method."""
  return BatchNorm(use_running_average=not train, name=name, dtype=dtype)(
      x, capture_stats=capture_stats)


def conv_bn(x, features: int, kernel: int, stride: int = 1, *, name: str, train: bool,
            capture_stats: bool, groups: int = 1, act=None, dtype: Any = None):
  """torchvision Conv2dNormActivation: conv `<name>_0` (no bias), BatchNorm `<name>_1`, `act`;
  call it inside a compact method (the layers become children of the calling module)."""
  x = conv(features, kernel, stride, groups=groups, name=f"{name}_0", dtype=dtype)(x)
  x = batch_norm(x, name=f"{name}_1", train=train, capture_stats=capture_stats, dtype=dtype)
  return act(x) if act is not None else x


def adaptive_avg_pool(x, out_hw: tuple[int, int]):
  """torch AdaptiveAvgPool2d on NHWC: the mean over each (row bin x column bin) rectangle, bin i
  of an axis being [floor(i*size/out), ceil((i+1)*size/out)) (bins overlap when out > size).
  Pooled one axis at a time: the mean of a rectangle is the mean of its row means."""
  for axis, out in zip((1, 2), out_hw):
    size = x.shape[axis]
    if size != out:
      bins = [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]
      x = jnp.stack([jnp.mean(jax.lax.slice_in_dim(x, a, b, axis=axis), axis=axis)
                     for a, b in bins], axis=axis)
  return x


def dropout(module: nn.Module, x, rate: float, train: bool):
  """Dropout active only when training AND a 'dropout' PRNG is supplied (`rngs={'dropout': k}`):
  the squeeze and relabel training steps pass one; evaluation, synthesis and `init` need none."""
  return nn.Dropout(rate, deterministic=not (train and module.has_rng("dropout")))(x)
