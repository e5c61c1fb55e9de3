# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # dwa_jax: DWA and SRe2L dataset distillation in JAX
#
# This notebook installs `dwa_jax`, checks the runtime, runs the digits demo end to end
# (teacher → SRe2L and DWA synthesis → students with online soft labels → results table), shows
# the synthetic images, and then shows how the CIFAR-100 / ImageNet configs would run on a GPU or
# TPU runtime (not yet run: this notebook has run only on a CPU). The first cell installs the
# package from the clone this notebook sits in, or else from `REPO_URL` (the repository's git
# URL: fill it in when the notebook is opened on its own, e.g. on Colab from GitHub), together
# with JAX's own build for the runtime's accelerator (`jax[cuda12]`, `jax[tpu]`). `DWA_SMOKE=1`
# shrinks every size so the notebook test can run it in minutes.

# %%
import glob
import os
import pathlib
import shutil
import subprocess
import sys

# JAX takes 75 % of a GPU's memory when it starts; the command-line cells below start more
# JAX processes, so this kernel allocates as it goes instead.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
SMOKE = os.environ.get("DWA_SMOKE") == "1"
REPO_URL = os.environ.get("DWA_REPO_URL", "")  # @param {type:"string"}


def find_clone():
  """The dwa_jax clone around the working directory (a notebook opened from a clone), or None."""
  for folder in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents):
    project = folder / "pyproject.toml"
    if project.is_file() and 'name = "dwa_jax"' in project.read_text():
      return folder
  return None


def jax_for_runtime():
  """JAX's install extra for this runtime's accelerator, so that pip keeps JAX and its CUDA
  plugin or libtpu consistent (the way JAX documents installing it)."""
  if shutil.which("nvidia-smi"):
    return ["jax[cuda12]"]
  if os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_NAME") or glob.glob("/dev/accel*") \
      or glob.glob("/dev/vfio/[0-9]*"):
    return ["jax[tpu]"]
  return []


try:
  import dwa_jax  # already installed (e.g. a Jupyter kernel in the project's environment)
except ImportError:
  clone = find_clone()
  if clone is not None:
    source = str(clone)
  elif REPO_URL:
    source = REPO_URL if os.path.isdir(REPO_URL) else f"git+{REPO_URL}"
  else:
    raise SystemExit("dwa_jax is not installed and this notebook is not inside a clone of it: "
                     "set REPO_URL in this cell to the repository's git URL and run it again")
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", source, *jax_for_runtime()],
                 check=True)

# %% [markdown]
# ## Runtime check
# JAX picks the accelerator automatically; on Colab choose *Runtime → Change runtime type → GPU
# or TPU*. Everything below also runs on a CPU, only slower.

# %%
import jax

print("JAX", jax.__version__, "backend:", jax.default_backend())
print("devices:", jax.devices())

# %% [markdown]
# ## The digits demo
# scikit-learn's embedded 8x8 digits: no download. `configs/demo_digits.py` holds the settings;
# any field can be changed here before running.

# %%
import pathlib

from dwa_jax import main as dwa_main
from dwa_jax import presets

config = presets.demo_digits()  # the settings of configs/demo_digits.py
if SMOKE:
  config.ipc = 1
  config.teacher.epochs = 1
  config.recover.iterations, config.recover.adjust_steps = 3, 2
  config.relabel.epochs, config.relabel.seeds = 2, (0,)
workdir = pathlib.Path("workdir/colab_demo")
results = dwa_main.run_stages(config, workdir)

# %% [markdown]
# ## The synthetic images
# Rows: ipc index; columns: classes 0-9.

# %%
from PIL import Image

for method in config.methods:
  grid = Image.open(workdir / "synthetic" / method / "grid.png")
  print(method, grid.size)
  if not SMOKE:
    from IPython.display import display
    display(grid)

# %% [markdown]
# ## Results
# Final-epoch and best top-1 on the real digits test split, mean ± std over seeds.

# %%
print((workdir / "results.md").read_text())

# %% [markdown]
# ## The command line
# Every stage also runs from the command line. `--config=configs/<name>.py` works from any
# directory: the config files are installed with the package. Here the teacher alone, briefly:

# %%
command = [sys.executable, "-m", "dwa_jax.main", "--config=configs/demo_digits.py",
           "--workdir=workdir/cli_demo", "--config.stage=squeeze",
           f"--config.teacher.epochs={1 if SMOKE else 5}"]
# This kernel holds the accelerator (a TPU's chips open in one process only), and the tiny
# digits teacher needs none: the command runs on the CPU.
print(subprocess.run(command, check=True, capture_output=True, text=True,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout)

# %% [markdown]
# ## CIFAR-100 and ImageNet on a GPU / TPU runtime (not yet run)
#
# No GPU or TPU has run this project or this notebook: the cells below are written from the
# code paths checked on the CPU, not tried on Colab's accelerators (docs/accelerators.md says
# what is and is not known). Run the stages in this kernel, which already holds the accelerator
# (a second JAX process cannot open a TPU's chips while this one has them):
#
# ```
# from dwa_jax.configs import cifar100_dwa
# config = cifar100_dwa.get_config()
# config.data_dir = "/content/tfds"
# dwa_main.run_stages(config, pathlib.Path("/content/cifar100"))
# ```
#
# or from the command line in a fresh runtime (*Runtime → Restart session*, then no cell that
# imports JAX). CIFAR-100 comes from `tensorflow-datasets` (read with `tfds.data_source`, no
# TensorFlow needed); the first run downloads and prepares it, in a child process that sees no
# accelerator (preparing imports TensorFlow, which would take GPU memory from JAX):
#
# ```
# !python -m dwa_jax.main --config=configs/cifar100_dwa.py --workdir=/content/cifar100 \
#     --config.data_dir=/content/tfds
# ```
#
# ImageNet-1K needs the `imagenet2012` tfds data prepared in `data_dir` (manual download terms)
# and torchvision's ResNet-18 weights converted to a state-dict `.npz` (`.pth` needs torch,
# which Colab has; `.safetensors` does not):
#
# ```
# !dwa-jax-convert --model=resnet18 --num_classes=1000 --input=/content/resnet18-f37072fd.pth \
#     --output=/content/resnet18.npz
# !python -m dwa_jax.main --config=configs/imagenet_dwa.py --workdir=/content/imagenet \
#     --config.data_dir=/content/tfds --config.teacher.checkpoint=/content/resnet18.npz \
#     --config.ipc=10
# ```
#
# Stages can be run separately (`--config.stage=recover`), e.g. to re-synthesise with other
# hyper-parameters against the same teacher. Cross-architecture evaluation (paper Tables 4-5)
# trains other students on the same synthetic set, e.g.
# `--config.stage=relabel --config.relabel.student=mobilenet_v2` (also `shufflenet_v2_x1_0`,
# `efficientnet_b0`, `vgg16_bn`, `resnet50`, ...).
