"""Models and the torch-semantics BatchNorm, checked against direct formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwa_jax import convert
from dwa_jax.models import build_model
from dwa_jax.models.layers import BN_STATS, BatchNorm, channel_mean_var


def test_channel_mean_var_is_biased_two_pass():
  """Biased variance, computed as the mean of squared deviations: at a mean of 1e3 and std 2
  in float32 the one-pass E[x²] − E[x]² is off by 16 % here, the two-pass form by 4e-7."""
  x = np.random.default_rng(0).normal(1e3, 2.0, (4, 5, 6, 7)).astype(np.float32)
  mean, var = channel_mean_var(jnp.asarray(x))
  exact = x.astype(np.float64).reshape(-1, 7)
  np.testing.assert_allclose(mean, exact.mean(0), rtol=1e-6)
  np.testing.assert_allclose(var, exact.var(0, ddof=0), rtol=1e-5)


def test_batchnorm_eval_and_train_follow_torch():
  rng = np.random.default_rng(1)
  x = rng.normal(1.0, 3.0, (8, 4, 4, 3)).astype(np.float32)
  bn = BatchNorm()
  variables = bn.init(jax.random.key(0), x)
  variables = {"params": {"scale": jnp.array([1.0, 2.0, 0.5]), "bias": jnp.array([0.0, 1.0, -1.0])},
               "batch_stats": {"mean": jnp.array([0.1, 0.2, 0.3]), "var": jnp.array([1.0, 4.0, 9.0])}}
  y = bn.apply(variables, x, use_running_average=True)
  p, s = variables["params"], variables["batch_stats"]
  expected = (x - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"]
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)

  y, state = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  flat = x.reshape(-1, 3)
  np.testing.assert_allclose(y, (x - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5) * p["scale"]
                             + p["bias"], rtol=1e-4, atol=1e-4)
  # torch: running = 0.9 running + 0.1 batch, the variance unbiased.
  np.testing.assert_allclose(state["batch_stats"]["mean"], 0.9 * s["mean"] + 0.1 * flat.mean(0),
                             rtol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["var"], 0.9 * s["var"] + 0.1 * flat.var(0, ddof=1),
                             rtol=1e-5)


def test_batchnorm_sows_input_statistics_only_when_asked():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 3, 4)), jnp.float32)
  bn = BatchNorm()
  variables = bn.init(jax.random.key(0), x)
  _, state = bn.apply(variables, x, capture_stats=True, mutable=[BN_STATS])
  mean, var = state[BN_STATS]["mean_var"][0]
  np.testing.assert_allclose(mean, np.asarray(x).reshape(-1, 4).mean(0), rtol=1e-5)
  np.testing.assert_allclose(var, np.asarray(x).reshape(-1, 4).var(0), rtol=1e-4)
  _, state = bn.apply(variables, x, mutable=[BN_STATS])
  assert BN_STATS not in state


@pytest.mark.parametrize("name,classes,image,n_params,feature_shape", [
    ("resnet18_cifar", 10, (32, 32, 3), 11_173_962, (4, 4, 512)),
    ("resnet18", 10, (64, 64, 3), 11_181_642, (2, 2, 512)),
    ("resnet50", 10, (64, 64, 3), 23_528_522, (2, 2, 2048)),
    ("convnet", 10, (32, 32, 3), 320_010, (8, 8, 128)),
    ("mobilenet_v2", 1000, (224, 224, 3), 3_504_872, None),
    ("shufflenet_v2_x1_0", 1000, (224, 224, 3), 2_278_604, None),
    ("efficientnet_b0", 1000, (224, 224, 3), 5_288_548, None),
    ("vgg16_bn", 1000, (224, 224, 3), 138_365_992, None),
])
def test_parameter_counts_match_torchvision(name, classes, image, n_params, feature_shape):
  # Counts of the torchvision models and of the DC ConvNetW128.
  model = build_model(name, classes)
  template = convert.model_template(model, image)
  count = sum(np.prod(l.shape) for l in jax.tree.leaves(template["params"]))
  assert count == n_params
  if feature_shape is not None:
    out = jax.eval_shape(lambda v, x: model.apply(v, x, features=True), template,
                         jax.ShapeDtypeStruct((2, *image), jnp.float32))
    assert out[0].shape == (2, classes) and out[1].shape == (2, *feature_shape)


def test_cifar_stem_has_3x3_stride1_conv_and_no_pool():
  template = convert.model_template(build_model("resnet18_cifar", 10), (32, 32, 3))
  assert template["params"]["conv1"]["kernel"].shape == (3, 3, 3, 64)
  imagenet = convert.model_template(build_model("resnet18", 10), (32, 32, 3))
  assert imagenet["params"]["conv1"]["kernel"].shape == (7, 7, 3, 64)


def test_unknown_model_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown model 'resnet19'"):
    build_model("resnet19", 10)


def test_torch_padding_not_flax_same():
  # A stride-2 3x3 conv with torch padding 1 on an even input sees one zero row on top; Flax
  # 'SAME' would pad only at the bottom. Check the model's conv matches explicit torch maths.
  x = np.arange(2 * 4 * 4).reshape(2, 4, 4, 1).astype(np.float32)
  from dwa_jax.models.layers import conv
  layer = conv(1, 3, 2)
  variables = {"params": {"kernel": jnp.ones((3, 3, 1, 1))}}
  y = np.asarray(layer.apply(variables, x))[..., 0]
  padded = np.pad(x[..., 0], ((0, 0), (1, 1), (1, 1)))
  expected = np.array([[[padded[b, i:i + 3, j:j + 3].sum() for j in (0, 2)] for i in (0, 2)]
                       for b in range(2)])
  np.testing.assert_allclose(y, expected)
