"""Model zoo: `build_model(name, num_classes)` returns a Flax module.

Every model takes NHWC images and is called as `model.apply(variables, x, train=..., capture_stats=...)`.
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dwa_jax.models.convnet import ConvNet
from dwa_jax.models.efficientnet import EfficientNetB0
from dwa_jax.models.mobilenet import MobileNetV2
from dwa_jax.models.resnet import resnet
from dwa_jax.models.shufflenet import ShuffleNetV2
from dwa_jax.models.vgg import VGG

# name -> constructor(num_classes, dtype=...); "_cifar": the 3x3 stride-1 stem, no max-pool.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "convnet": ConvNet,
    # A small BN teacher for 224 px runs on a CPU (benchmarks/imagenet_scale.py).
    "convnet_w16_d5": functools.partial(ConvNet, width=16, depth=5),
    **{f"resnet{d}": functools.partial(resnet, d) for d in (18, 34, 50, 101)},
    **{f"resnet{d}_cifar": functools.partial(resnet, d, cifar_stem=True)
       for d in (18, 34, 50, 101)},
    # torchvision ImageNet architectures; they run on any input size (32x32 CIFAR included).
    "mobilenet_v2": MobileNetV2,
    "shufflenet_v2_x1_0": ShuffleNetV2,
    "efficientnet_b0": EfficientNetB0,
    "vgg16_bn": VGG,
}


def build_model(name: str, num_classes: int, dtype: Any = None) -> nn.Module:
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; choose one of {sorted(MODELS)}.")
  if num_classes < 1:
    raise ValueError(f"num_classes must be positive, got {num_classes}.")
  return MODELS[name](num_classes, dtype=dtype)


def model_template(model: nn.Module, image_shape: tuple[int, int, int]) -> Any:
  """Shapes and dtypes of the model's variables, without allocating or computing them."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
