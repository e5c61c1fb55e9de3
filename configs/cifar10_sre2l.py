"""CIFAR-10, ResNet-18 (CIFAR stem), SRe2L baseline. Paper: 27.2 / 47.5 (ipc 10 / 50)."""

from dwa_jax import presets


def get_config():
  return presets.cifar("cifar10", ("sre2l",))
