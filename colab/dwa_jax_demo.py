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
# This notebook installs `dwa_jax` (on Colab: set `DWA_REPO_URL` to the git URL of the
# repository; `pip install git+URL` brings the package and its `configs/`), checks the runtime, runs the digits demo end to end
# (teacher → SRe2L and DWA synthesis → students with online soft labels → results table), shows
# the synthetic images, and then explains how to run the CIFAR-100 / ImageNet configs on a GPU or
# TPU runtime. `DWA_SMOKE=1` shrinks every size so the notebook test can run it in minutes.

# %%
import os
import subprocess
import sys

SMOKE = os.environ.get("DWA_SMOKE") == "1"
IN_COLAB = "google.colab" in sys.modules
REPO_URL = os.environ.get("DWA_REPO_URL", "")  # the repository: a git URL (or a local folder)
INSTALL = IN_COLAB or os.environ.get("DWA_INSTALL") == "1"  # its test installs as Colab would
if INSTALL and REPO_URL:
  spec = REPO_URL if os.path.isdir(REPO_URL) else f"git+{REPO_URL}"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", spec], check=True)

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
print(subprocess.run(command, check=True, capture_output=True, text=True).stdout)

# %% [markdown]
# ## CIFAR-100 and ImageNet on a GPU / TPU runtime
#
# CIFAR-100 comes from `tensorflow-datasets` (`tfds.data_source`, no TensorFlow needed):
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
