"""Dropout whose random bits come from a cheap counter hash.

flax's nn.Dropout draws one threefry-generated uniform per element. In a
MaskGIT train step on XLA:CPU those bits (attention dropout alone is
B x heads x S x S per layer) cost about a fifth of the step. Dropout needs
independent coin flips, not a cryptographic-strength stream, so here each
call takes two 32-bit seeds from its flax RNG (threefry, so calls, layers
and steps stay independent and a resumed run repeats them) and hashes the
element index with them: two rounds of the murmur3 finaliser, an order of
magnitude cheaper per element. Two seeds make the streams of two calls
unrelated rather than shifted copies of each other.

Kept values are scaled by 1 / (1 - rate) and the mask is a multiplier, so
the backward pass is one fused multiply; an element is dropped when its
32-bit hash falls below rate * 2^32, i.e. with probability `rate` to within
2^-32.
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _fmix32(x: jnp.ndarray) -> jnp.ndarray:
  """murmur3's 32-bit finaliser: a bijection with full avalanche."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def hashed_bits(rng: jax.Array, shape) -> jnp.ndarray:
  """uint32 [shape]: hash of each element's index under two seeds from rng."""
  seeds = jax.random.bits(rng, (2,), jnp.uint32)
  index = jax.lax.iota(jnp.uint32, int(np.prod(shape))).reshape(shape)
  return _fmix32(_fmix32(index + seeds[0]) ^ seeds[1])


def keep_scale(rng: jax.Array, shape, rate: float,
               dtype=jnp.float32) -> jnp.ndarray:
  """[shape] of 0 (dropped) and 1 / (1 - rate) (kept)."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate {rate}; valid: [0, 1).")
  threshold = jnp.uint32(min(int(round(rate * 2.0**32)), 2**32 - 1))
  keep = hashed_bits(rng, shape) >= threshold
  return keep.astype(dtype) * jnp.asarray(1.0 / (1.0 - rate), dtype)


class Dropout(nn.Module):
  """Inverted dropout on hashed bits (see the module docstring)."""
  rate: float
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    keep = self.keep_scale(x.shape, deterministic, x.dtype)
    return x if keep is None else x * keep

  def keep_scale(self, shape, deterministic: bool,
                 dtype=jnp.float32) -> Optional[jnp.ndarray]:
    """The multiplier `__call__` would apply to an input of this shape
    (the same bits), or None where it would pass the input through; for
    callers that apply the mask to parts of an array one at a time."""
    if deterministic or self.rate == 0.0:
      return None
    return keep_scale(self.make_rng(self.rng_collection), shape, self.rate,
                      dtype)
