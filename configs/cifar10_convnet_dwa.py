"""CIFAR-10, ConvNet-128 (BN) teacher and student, DWA. Paper: 45.0 / 63.3 (ipc 10 / 50)."""

from dwa_jax import presets


def get_config():
  return presets.cifar("cifar10", ("dwa",), model="convnet")
