"""Model zoo: `build_model(name, num_classes)` returns a Flax module.

Every model takes NHWC images and is called as `model.apply(variables, x, train=..., capture_stats=...)`.
"""

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

# name -> constructor(num_classes, dtype). "_cifar" variants use the 3x3 stride-1 stem, no max-pool.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "convnet": lambda num_classes, dtype=None: ConvNet(num_classes, dtype=dtype),
    # A small BN teacher for 224 px runs on a CPU (benchmarks/imagenet_scale.py).
    "convnet_w16_d5": lambda num_classes, dtype=None: ConvNet(num_classes, width=16, depth=5,
                                                              dtype=dtype),
    **{f"resnet{d}": (lambda num_classes, dtype=None, d=d: resnet(d, num_classes, False, dtype))
       for d in (18, 34, 50, 101)},
    **{f"resnet{d}_cifar": (lambda num_classes, dtype=None, d=d: resnet(d, num_classes, True, dtype))
       for d in (18, 34, 50, 101)},
    # torchvision ImageNet architectures; they run on any input size (32x32 CIFAR included).
    "mobilenet_v2": lambda num_classes, dtype=None: MobileNetV2(num_classes, dtype=dtype),
    "shufflenet_v2_x1_0": lambda num_classes, dtype=None: ShuffleNetV2(num_classes, dtype=dtype),
    "efficientnet_b0": lambda num_classes, dtype=None: EfficientNetB0(num_classes, dtype=dtype),
    "vgg16_bn": lambda num_classes, dtype=None: VGG(num_classes, dtype=dtype),
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
