"""CIFAR-10 reproduction on a CPU: ResNet-18 (CIFAR stem) teacher and students, DWA and SRe2L.

As `reproduce_cifar10_convnet.py`, for the paper's ResNet-18 setting (DWA 32.6, SRe2L 27.2 at
ipc 10). A ResNet-18 teacher epoch takes far longer on the 2-core CPU, so the teacher is trained
for only a few epochs.
"""

import os
import pathlib

from dwa_jax import presets

SHARED = pathlib.Path(os.environ.get(
    "DWA_SHARED_DIR", pathlib.Path(__file__).resolve().parents[2] / "shared"))


def get_config():
  return presets.reproduce_cifar10(str(SHARED / "data" / "cifar10_jpeg.npz"), "resnet18_cifar",
                                   teacher_epochs=5)
