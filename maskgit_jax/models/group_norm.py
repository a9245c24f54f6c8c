"""GroupNorm with its statistics summed per channel first.

flax's nn.GroupNorm reshapes [..., C] to [..., groups, C / groups] and
reduces the pixels and the channels of each group in one reduction. On
XLA:CPU that reduction ran about 3x slower than the memory it reads once a
group holds several channels (2x256x256x128 with 32 groups: 22-24 ms for the
two statistics, against 3.3-4 ms for per-channel sums over the pixels).
Here the sums of x and x^2 run over the pixels per channel, then over each
group's channels ([B, C] -> [B, groups], nothing to speak of). The result
is flax's GroupNorm (same parameters "scale" and "bias", float32
statistics, E[x^2] - E[x]^2 clipped at zero, the same normalisation
order) up to the summation order's rounding.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class GroupNorm(nn.Module):
  """nn.GroupNorm(num_groups, epsilon, dtype) over [B, ..., C] inputs."""
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    channels = x.shape[-1]
    if self.num_groups <= 0 or channels % self.num_groups:
      raise ValueError(f"num_groups={self.num_groups} does not divide the "
                       f"{channels} channels.")
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    group_size = channels // self.num_groups
    stats_dtype = jnp.promote_types(self.dtype, jnp.float32)
    pixels = x.reshape(x.shape[0], -1, channels).astype(stats_dtype)
    count = pixels.shape[1] * group_size

    def group_mean(per_channel_sum):  # [B, C] -> [B, C], each group's mean
      sums = per_channel_sum.reshape(-1, self.num_groups, group_size)
      return jnp.repeat(jnp.sum(sums, axis=-1) / count, group_size, axis=-1)

    mean = group_mean(jnp.sum(pixels, axis=1))
    mean_square = group_mean(jnp.sum(jnp.square(pixels), axis=1))
    var = jnp.maximum(0.0, mean_square - jnp.square(mean))
    # [B, C] -> [B, 1, ..., 1, C] against x.
    expand = lambda v: v.reshape((x.shape[0],) + (1,) * (x.ndim - 2)
                                 + (channels,))
    y = x - expand(mean)
    y = y * expand(jax.lax.rsqrt(var + self.epsilon) * scale)
    return jnp.asarray(y + bias, self.dtype)
