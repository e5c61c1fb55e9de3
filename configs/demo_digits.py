"""The fast end-to-end demo on scikit-learn's embedded digits (8x8 grayscale, 10 classes).

Trains a ConvNet-BN teacher, synthesises ipc 10 with SRe2L and with DWA, and validates both and a
random real subset of the same size with the same online-KD students (3 seeds). Under 4 min on a
2-core CPU; no download. Settings: `dwa_jax.presets.demo_digits`.
"""

from dwa_jax import presets


def get_config():
  return presets.demo_digits()
