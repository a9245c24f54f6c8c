"""Winograd F(2x2, 3x3) convolutions equal XLA's, gradients included."""

import jax
import jax.numpy as jnp
import pytest

from helpers import assert_close_at_scale as assert_close
from helpers import assert_conv3x3_gradients_are_xlas
from maskgit_jax.models import conv
from maskgit_jax.models import vqgan as vqgan_lib
from maskgit_jax.models import winograd


@pytest.mark.parametrize("shape, features", [
    ((2, 8, 8, 4), 5), ((1, 5, 7, 3), 2), ((3, 1, 1, 2), 4),
    ((1, 6, 3, 16), 16)])
def test_conv3x3_is_the_direct_convolution(shape, features):
  x = jax.random.normal(jax.random.key(0), shape)
  kernel = jax.random.normal(jax.random.key(1), (3, 3, shape[-1], features))
  got = jax.jit(winograd.conv3x3)(x, kernel)
  assert got.shape == shape[:3] + (features,)
  assert_close(got, conv.xla_conv3x3(x, kernel))


def test_conv3x3_gradients_are_the_direct_convolution_gradients():
  assert_conv3x3_gradients_are_xlas(winograd.conv3x3, (2, 7, 6, 4), 3)


def test_conv3x3_rejects_other_kernel_sizes():
  with pytest.raises(ValueError, match=r"3x3 kernel.*\(5, 5, 2, 2\)"):
    winograd.conv3x3(jnp.zeros((1, 8, 8, 2)), jnp.zeros((5, 5, 2, 2)))


@pytest.mark.parametrize("shape, features, backend, expected", [
    ((2, 64, 64, 128), 128, "cpu", True),
    ((2, 256, 256, 128), 128, "cpu", True),
    ((2, 256, 256, 64), 64, "cpu", False),    # narrow channels
    ((2, 64, 64, 128), 64, "cpu", False),     # narrow output
    ((2, 16, 16, 512), 512, "cpu", False),    # 128 tiles
    ((2, 64, 64, 128), 128, "gpu", False),
    ((2, 64, 64, 128), 128, "tpu", False)])
def test_prefer_winograd(shape, features, backend, expected):
  assert winograd.prefer_winograd(shape, features, backend) is expected


def test_vqgan_decoder_on_wide_maps_uses_winograd_with_the_same_images(
    monkeypatch):
  """A decoder whose 3x3 convolutions qualify (128 channels, 64x64 maps)
  decodes the same images as with XLA's convolutions throughout."""
  model = vqgan_lib.VQGAN(filters=128, channel_multipliers=(1,),
                          num_res_blocks=1, embedding_dim=8, codebook_size=16)
  assert winograd.prefer_winograd((1, 64, 64, 128), 128)
  indices = jax.random.randint(jax.random.key(0), (1, 64, 64), 0, 16)
  params = jax.jit(model.init)(jax.random.key(1),
                               jnp.zeros((1, 64, 64, 3)))["params"]
  decode = lambda: jax.jit(lambda p, i: model.apply(
      {"params": p}, i, method=model.decode_from_indices))(params, indices)
  with_winograd = decode()
  monkeypatch.setattr(winograd, "MIN_CHANNELS", 10**9)
  assert not winograd.prefer_winograd((1, 64, 64, 128), 128)
  assert_close(with_winograd, decode(), 1e-5)


def test_conv3x3_second_derivatives_are_the_direct_convolutions():
  """An R1-style penalty (the squared input gradient) differentiated again:
  the custom gradient's own gradients match XLA's convolution."""
  x = jax.random.normal(jax.random.key(0), (2, 7, 6, 4))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 4, 3))

  def penalty_gradients(conv3x3):
    def penalty(kernel, x):
      dx = jax.grad(lambda x: jnp.sum(jnp.tanh(conv3x3(x, kernel))))(x)
      return jnp.sum(jnp.square(dx))
    return jax.jit(jax.grad(penalty, argnums=(0, 1)))(kernel, x)

  for got, want in zip(penalty_gradients(winograd.conv3x3),
                       penalty_gradients(conv.xla_conv3x3), strict=True):
    assert_close(got, want, 1e-5)
