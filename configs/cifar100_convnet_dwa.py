"""CIFAR-100, ConvNet-128 (BN) teacher and student, DWA. Paper: 47.6 / 59.0 (ipc 10 / 50)."""

from dwa_jax import presets


def get_config():
  return presets.cifar("cifar100", ("dwa",), model="convnet")
