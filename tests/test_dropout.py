"""The transformer's dropout: the drop rate, the expected value, and streams
that are independent across keys yet repeat for the same key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgit_jax.models import dropout

SHAPE = (64, 4, 65, 65)  # the demo's attention probabilities: 1.08M draws


def _kept(rng, rate, shape=SHAPE):
  return np.asarray(dropout.keep_scale(rng, shape, rate)) > 0


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_drops_the_rate_and_keeps_the_expected_value(rate):
  x = jnp.ones(SHAPE)
  out = np.asarray(dropout.Dropout(rate).apply(
      {}, x, deterministic=False, rngs={"dropout": jax.random.key(3)}))
  kept = out > 0
  n = kept.size
  sigma = np.sqrt(rate * (1 - rate) / n)
  assert abs((1 - kept.mean()) - rate) < 5 * sigma
  np.testing.assert_allclose(out[kept], 1 / (1 - rate), rtol=1e-6)
  assert abs(out.mean() - 1.0) < 5 * sigma / (1 - rate)


def test_each_position_is_dropped_uniformly():
  """Over many keys every index is dropped about `rate` of the time (no
  position-dependent bias in the hash)."""
  masks = np.stack([_kept(jax.random.key(k), 0.25, (4096,))
                    for k in range(400)])
  per_index = 1 - masks.mean(axis=0)
  sigma = np.sqrt(0.25 * 0.75 / 400)
  assert np.abs(per_index - 0.25).max() < 5.5 * sigma
  assert abs(per_index.mean() - 0.25) < 5 * sigma / 64


def test_keys_give_unrelated_masks_and_the_same_key_repeats():
  a = _kept(jax.random.key(0), 0.5).ravel().astype(np.float64)
  b = _kept(jax.random.key(1), 0.5).ravel().astype(np.float64)
  np.testing.assert_array_equal(a, _kept(jax.random.key(0), 0.5).ravel())
  assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size)
  # Neighbouring elements of one mask are unrelated too.
  assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 5 / np.sqrt(a.size)
  # Nor is one key's mask a shifted copy of the other's.
  for shift in (1, 2, 65, 4225):
    assert abs(np.corrcoef(a[shift:], b[:-shift])[0, 1]) < 5 / np.sqrt(a.size)


def test_identity_when_deterministic_or_rate_zero_and_gradient_is_the_mask():
  x = jax.random.normal(jax.random.key(0), (8, 65, 96))
  rngs = {"dropout": jax.random.key(1)}
  layer = dropout.Dropout(0.1)
  np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(
      dropout.Dropout(0.0).apply({}, x, deterministic=False, rngs=rngs), x)
  # On ones the output is the 0 / (1 / keep) multiplier, which is also the
  # gradient of the sum at any input.
  multiplier = layer.apply({}, jnp.ones_like(x), deterministic=False,
                           rngs=rngs)
  grad = jax.grad(lambda v: jnp.sum(
      layer.apply({}, v, deterministic=False, rngs=rngs)))(x)
  np.testing.assert_array_equal(grad, multiplier)
  assert 0 < float(jnp.mean(multiplier == 0)) < 0.2
  # keep_scale gives that multiplier without an input, or None where the
  # layer passes its input through.
  keep = layer.apply({}, x.shape, False, rngs=rngs, method="keep_scale")
  np.testing.assert_array_equal(keep, multiplier)
  assert layer.apply({}, x.shape, True, method="keep_scale") is None
  assert dropout.Dropout(0.0).apply({}, x.shape, False, rngs=rngs,
                                    method="keep_scale") is None


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_bad_rate_is_refused(rate):
  with pytest.raises(ValueError, match=r"dropout rate .*\[0, 1\)"):
    dropout.keep_scale(jax.random.key(0), (4,), rate)
