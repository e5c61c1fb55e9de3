"""Tiny-ImageNet (folder in --config.data_dir), ResNet-18 (CIFAR stem), DWA. Paper: 52.8 / 56.0 (ipc 50 / 100)."""

from dwa_jax import presets


def get_config():
  return presets.tiny_imagenet(("dwa",))
