"""CIFAR-10 ipc 10, ConvNet-128 (BN), under the official evaluation protocol, with the saved
40-epoch teacher.

The teacher is `benchmarks/results/teachers/cifar10_convnet_e40.npz` (the official CIFAR recipe
for 40 epochs instead of 200; its recipe, command and accuracy are in the `.json` beside it),
imported instead of trained, so every run of this config distils the same network. Synthesis:
the paper's CIFAR settings without the authors' quirks (our DWA and SRe2L). Students: the
official CIFAR relabel, including its teacher in train mode (BN on batch statistics), evaluated
every 50 epochs instead of every 10 (an evaluation of the 10,000 test images costs about 20 s
here). Run by `benchmarks/reproduce_cifar10.py`; `benchmarks/protocol_cifar10.py` changes one
protocol control or synthesis option at a time from it. Paper: DWA 45.0.
"""

import os
import pathlib

from dwa_jax import presets

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("DWA_SHARED_DIR", REPO.parent / "shared"))
TEACHER = REPO / "benchmarks" / "results" / "teachers" / "cifar10_convnet_e40.npz"


def get_config():
  c = presets.reproduce_cifar10(str(SHARED / "data" / "cifar10_jpeg.npz"), "convnet",
                                teacher_epochs=40)
  c.teacher.checkpoint = str(TEACHER)
  c.relabel.teacher_train_mode = True
  c.relabel.eval_every = 50
  return c
