"""models/group_norm.GroupNorm is flax's nn.GroupNorm, computed otherwise."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgit_jax.models.group_norm import GroupNorm


def _inputs_and_params(shape, num_groups, seed=0):
  """An input with per-channel offsets and parameters away from 1 and 0, so
  a wrong mean, variance, scale or bias shows."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape) * 3 + rng.standard_normal(shape[-1]) * 2
  params = nn.GroupNorm(num_groups).init(jax.random.key(0), x)
  params = jax.tree.map(
      lambda p: p + rng.standard_normal(p.shape).astype(np.float32) * 0.5,
      params)
  return jnp.asarray(x, jnp.float32), params


@pytest.mark.parametrize("shape, num_groups", [
    ((2, 8, 8, 64), 32),    # 2 channels a group
    ((2, 5, 7, 32), 32),    # 1 channel a group
    ((3, 4, 4, 128), 8),    # 16 channels a group
    ((2, 9, 48), 4)])       # a sequence [B, N, C]
def test_values_and_gradients_are_flaxs(shape, num_groups):
  x, params = _inputs_and_params(shape, num_groups)
  ours, flax_norm = GroupNorm(num_groups), nn.GroupNorm(num_groups)
  probe = jax.random.normal(jax.random.key(1), shape)

  def loss(module):
    return lambda p, x: jnp.sum(probe * jnp.tanh(module.apply(p, x)))

  np.testing.assert_allclose(jax.jit(ours.apply)(params, x),
                             flax_norm.apply(params, x), rtol=1e-5, atol=1e-5)
  got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(params, x)
  want = jax.grad(loss(flax_norm), argnums=(0, 1))(params, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-4,
                               atol=1e-5 * float(np.max(np.abs(w))))


def test_parameters_are_flaxs_so_checkpoints_load():
  x = jnp.zeros((1, 4, 4, 64))
  ours = GroupNorm(32).init(jax.random.key(0), x)
  theirs = nn.GroupNorm(32).init(jax.random.key(0), x)
  assert (jax.tree.map(lambda p: (p.shape, p.dtype), ours)
          == jax.tree.map(lambda p: (p.shape, p.dtype), theirs))
  np.testing.assert_array_equal(ours["params"]["scale"], 1.0)
  np.testing.assert_array_equal(ours["params"]["bias"], 0.0)


def test_bfloat16_output_with_float32_statistics():
  x, params = _inputs_and_params((2, 8, 8, 64), 32)
  x = x.astype(jnp.bfloat16)
  got = GroupNorm(32, dtype=jnp.bfloat16).apply(params, x)
  want = nn.GroupNorm(32, dtype=jnp.bfloat16).apply(params, x)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), atol=0.05)


def test_constant_groups_give_the_bias_not_nan():
  x = jnp.full((1, 4, 4, 8), 3.0)
  params = {"params": {"scale": jnp.full((8,), 2.0),
                       "bias": jnp.arange(8.0)}}
  np.testing.assert_allclose(GroupNorm(4).apply(params, x),
                             jnp.broadcast_to(jnp.arange(8.0), x.shape),
                             atol=1e-6)


@pytest.mark.parametrize("num_groups", [0, 3])
def test_groups_that_do_not_divide_the_channels_are_refused(num_groups):
  with pytest.raises(ValueError, match=f"num_groups={num_groups} .* 8"):
    GroupNorm(num_groups).init(jax.random.key(0), jnp.zeros((1, 2, 2, 8)))
