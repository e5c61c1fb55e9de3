"""The fast end-to-end demo on scikit-learn's embedded digits (8x8 grayscale, 10 classes).

Trains a ConvNet-BN teacher, synthesises ipc 10 with SRe2L and with DWA, and validates both and a
random real subset of the same size with the same online-KD students (3 seeds). Runs in a few
minutes on a 2-core CPU; no download. Settings are the CIFAR recipe scaled down to the data.
"""

from dwa_jax import presets


def get_config():
  c = presets.cifar("digits", ("sre2l", "dwa"), model="convnet")
  c.teacher.epochs = 30
  c.teacher.batch_size = 64
  c.teacher.lr = 0.05
  c.teacher.eval_every = 5
  c.recover.iterations = 300
  c.recover.jitter = 1       # 4 px on 32 px images is 1 px on 8 px images
  c.relabel.epochs = 150
  c.relabel.batch_size = 64
  c.relabel.temperature = 4.0
  return c
