"""Layers with PyTorch semantics, so torchvision weights and recipes carry over exactly.

Naming convention shared by every model in `dwa_jax.models` (the torch importer relies on it):
a Flax module path maps to a torchvision state-dict prefix by joining path components with '.'
and turning a trailing `_<int>` of a component into `.<int>` (`layer1_0` -> `layer1.0`,
`downsample_1` -> `downsample.1`, `features_4` -> `features.4`). Leaves map as
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

    need_batch_stats = capture_stats or not use_ra
    if need_batch_stats:
      mean, var = channel_mean_var(x)
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
    return (x - mean) * inv + bias


def torch_padding(pad: int) -> Sequence[tuple[int, int]]:
  """Explicit symmetric padding as torch uses it (Flax 'SAME' pads asymmetrically for stride 2)."""
  return ((pad, pad), (pad, pad))


def conv(features: int, kernel: int, stride: int = 1, pad: int | None = None, bias: bool = False,
         groups: int = 1, name: str | None = None, dtype: Any = None) -> nn.Conv:
  """A torch-style Conv2d: explicit padding (kernel // 2 by default), no bias unless asked.

  Initialised like torchvision's ResNet (kaiming normal, fan_out, relu gain).
  """
  pad = kernel // 2 if pad is None else pad
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=torch_padding(pad),
                 use_bias=bias, feature_group_count=groups, name=name, dtype=dtype,
                 kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))


def max_pool_torch(x, window: int, stride: int, pad: int):
  """torch MaxPool2d with -inf padding."""
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding=torch_padding(pad))
