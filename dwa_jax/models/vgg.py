"""torchvision VGG-16 with BatchNorm in Flax (NHWC).

Names keep torch's flat Sequential indices (ReLUs and pools count): `features_0` (conv),
`features_1` (BN), ..., `classifier_0/3/6`. The 7x7 adaptive average pool is torch's, so on
32x32 inputs the 1x1 final map is replicated to 7x7 exactly as torchvision does, and the
classifier flattens in torch's (C, H, W) order so imported weights need no permutation.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dwa_jax.models.layers import adaptive_avg_pool, batch_norm, conv, dropout

# Configuration "D": conv widths, "M" = 2x2 max-pool.
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
  """Dropout 0.5 in the classifier, active only with a 'dropout' PRNG (layers.dropout)."""
  num_classes: int
  layers: tuple = VGG16
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False, capture_stats: bool = False, features: bool = False):
    index = 0
    for v in self.layers:
      if v == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        index += 1
        continue
      x = conv(v, 3, 1, bias=True, name=f"features_{index}", dtype=self.dtype)(x)
      x = nn.relu(batch_norm(x, name=f"features_{index + 1}", train=train,
                             capture_stats=capture_stats, dtype=self.dtype))
      index += 3
    feature_map = x
    x = adaptive_avg_pool(x, (7, 7))
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    # torchvision initialises the linear layers with N(0, 0.01).
    dense = lambda n, name: nn.Dense(n, kernel_init=nn.initializers.normal(0.01), name=name,
                                     dtype=self.dtype)
    x = dropout(self, nn.relu(dense(4096, "classifier_0")(x)), 0.5, train)
    x = dropout(self, nn.relu(dense(4096, "classifier_3")(x)), 0.5, train)
    logits = dense(self.num_classes, "classifier_6")(x)
    return (logits, feature_map) if features else logits
