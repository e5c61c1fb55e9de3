"""Tiny-ImageNet, ResNet-18 (CIFAR stem), SRe2L. Paper: 41.1 / 49.7 (ipc 50 / 100)."""

from dwa_jax import presets


def get_config():
  return presets.tiny_imagenet(("sre2l",))
