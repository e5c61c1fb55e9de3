"""CIFAR-10 reproduction on a CPU: ConvNet-128 (BN) teacher and students, DWA and SRe2L, ipc 10.

Data: the JPEG-bytes CIFAR-10 in ../shared/data (or $DWA_SHARED_DIR/data). Synthesis and relabel
use the paper's / official CIFAR settings (SPEC.md), except where the 2-core CPU budget forces
less: the teacher trains 8 epochs instead of the official 200 (a ConvNet epoch takes about 4
minutes here), and students are evaluated every 50 epochs instead of every 10 (each evaluation
of the 10,000 test images takes about 20 s). Run by `benchmarks/reproduce_cifar10.py`.
Paper: DWA 45.0 (ConvNet-128, CIFAR-10, ipc 10).
"""

import os
import pathlib

from dwa_jax import presets

SHARED = pathlib.Path(os.environ.get(
    "DWA_SHARED_DIR", pathlib.Path(__file__).resolve().parents[2] / "shared"))


def get_config():
  c = presets.reproduce_cifar10(str(SHARED / "data" / "cifar10_jpeg.npz"), "convnet",
                                teacher_epochs=8)
  c.relabel.eval_every = 50
  return c
