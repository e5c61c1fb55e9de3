"""CIFAR-10, ResNet-18 (CIFAR stem), DWA. Paper: 32.6 / 53.1 (ipc 10 / 50)."""

from dwa_jax import presets


def get_config():
  return presets.cifar("cifar10", ("dwa",))
