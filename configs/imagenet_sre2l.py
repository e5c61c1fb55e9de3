"""ImageNet-1K, torchvision ResNet-18 teacher, SRe2L. Paper: 21.3 / 46.8 / 52.8 (ipc 10 / 50 / 100)."""

from dwa_jax import presets


def get_config():
  return presets.imagenet(("sre2l",))
