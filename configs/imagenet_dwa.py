"""ImageNet-1K (tfds imagenet2012), torchvision ResNet-18 teacher, DWA. Paper: 37.9 / 55.2 / 59.2 (ipc 10 / 50 / 100)."""

from dwa_jax import presets


def get_config():
  return presets.imagenet(("dwa",))
