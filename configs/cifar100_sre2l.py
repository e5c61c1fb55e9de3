"""CIFAR-100, ResNet-18 (CIFAR stem), SRe2L baseline. Paper: 31.6 / 52.2 (ipc 10 / 50)."""

from dwa_jax import presets


def get_config():
  return presets.cifar("cifar100", ("sre2l",))
