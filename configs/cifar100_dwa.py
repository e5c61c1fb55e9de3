"""CIFAR-100, ResNet-18 (CIFAR stem), DWA. Paper: 39.6 / 60.9 (ipc 10 / 50)."""

from dwa_jax import presets


def get_config():
  return presets.cifar("cifar100", ("dwa",))
