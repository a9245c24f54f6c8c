"""StyleGAN2-style discriminator for the tokenizer's adversarial loss.

Residual blocks halve the resolution with a [1, 3, 3, 1] blur before
subsampling (anti-aliased, Zhang 2019) down to 4x4, then two dense layers
give one logit per image. Leaky ReLU 0.2, residual sum scaled by 1/sqrt(2),
as in the official MaskGIT discriminator. No normalisation layers, so the R1
penalty can be taken per example.
"""

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maskgit_jax.models.conv import Conv1x1, Conv3x3

Dtype = Any

_BLUR_TAPS = {3: (1., 2., 1.), 4: (1., 3., 3., 1.), 5: (1., 4., 6., 4., 1.)}


def _conv3x3(features: int, dtype: Dtype, name: str) -> Conv3x3:
  """nn.Conv(features, (3, 3)) with xavier-uniform kernels. The tokenizer
  updates the discriminator inside a lax.cond, where XLA:CPU's own kernel
  gradients ran 7-30x slower than outside: on CPU they are matrix
  multiplies here (conv.direct_conv3x3)."""
  return Conv3x3(features, dtype, use_bias=True, gemm_kernel_gradient=True,
                 kernel_init=nn.initializers.xavier_uniform(), name=name)


def leaky_relu(x: jnp.ndarray) -> jnp.ndarray:
  return jax.nn.leaky_relu(x, negative_slope=0.2)


def blur_downsample(x: jnp.ndarray, filter_size: int = 4) -> jnp.ndarray:
  """Depthwise binomial blur then stride-2 subsampling, 'SAME' padding."""
  taps = np.asarray(_BLUR_TAPS[filter_size], np.float32)
  kernel = np.outer(taps, taps)
  kernel /= kernel.sum()
  channels = x.shape[-1]
  kernel = jnp.asarray(np.tile(kernel[:, :, None, None], (1, 1, 1, channels)),
                       x.dtype)
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(2, 2), padding="SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=channels,
      precision=jax.lax.Precision.HIGHEST)


def filters_at(resolution: int, channel_multiplier: int,
               max_filters: int) -> int:
  """StyleGAN2 widths: 512 up to 32x32, then halving with resolution."""
  return min(max_filters, 16384 * channel_multiplier // resolution)


class DiscriminatorBlock(nn.Module):
  """conv3x3 -> act -> downsample -> conv3x3 -> act, plus a 1x1 shortcut."""
  filters: int
  blur_resample: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    downsample = (blur_downsample if self.blur_resample else
                  lambda y: nn.avg_pool(y, (2, 2), (2, 2), "SAME"))
    h = leaky_relu(_conv3x3(x.shape[-1], self.dtype, "conv1")(x))
    h = downsample(h)
    shortcut = Conv1x1(self.filters, self.dtype,
                       kernel_init=nn.initializers.xavier_uniform(),
                       name="shortcut")(downsample(x))
    h = leaky_relu(_conv3x3(self.filters, self.dtype, "conv2")(h))
    return (h + shortcut) / math.sqrt(2.0)


class Discriminator(nn.Module):
  """Images [B, S, S, C] (S a power of two, >= 8) -> logits [B, 1]."""
  image_size: int = 256
  channel_multiplier: int = 1
  max_filters: int = 512
  blur_resample: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    size = self.image_size
    if size < 8 or size & (size - 1):
      raise ValueError(f"Discriminator image_size must be a power of two >= 8, "
                       f"got {size}.")
    if x.shape[1:3] != (size, size):
      raise ValueError(f"Discriminator expects {size}x{size} images, got "
                       f"shape {x.shape}.")
    width = lambda res: filters_at(res, self.channel_multiplier,
                                   self.max_filters)
    init = nn.initializers.xavier_uniform()
    x = leaky_relu(_conv3x3(width(size), self.dtype, "conv_in")(x))
    resolution = size
    while resolution > 4:
      resolution //= 2
      x = DiscriminatorBlock(width(resolution), self.blur_resample, self.dtype,
                             name=f"block_{resolution}")(x)
    x = leaky_relu(_conv3x3(width(4), self.dtype, "conv_out")(x))
    x = x.reshape(x.shape[0], -1)
    x = leaky_relu(nn.Dense(width(4), kernel_init=init, dtype=self.dtype,
                            name="dense")(x))
    return nn.Dense(1, kernel_init=init, dtype=self.dtype,
                    name="logit")(x).astype(jnp.float32)
