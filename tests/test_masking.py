import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgit_jax import masking


def test_counts_follow_ceil_gamma_distribution():
  """P(count <= k) = P(cos(pi r / 2) N <= k) = 1 - (2 / pi) arccos(k / N)."""
  n, batch = 16, 40000
  mask = jax.jit(masking.random_mask, static_argnums=(1, 2, 3))(
      jax.random.key(0), batch, n, "cosine")
  counts = np.asarray(mask.sum(-1))
  assert counts.min() >= 1 and counts.max() <= n
  for k in range(1, n):
    want = 1 - 2 / math.pi * math.acos(k / n)
    assert np.mean(counts <= k) == pytest.approx(want, abs=0.015), k


def test_count_is_ceil_of_gamma_times_n():
  """With the linear schedule, count = ceil((1 - r) N) with r ~ U[0, 1)."""
  n = 10
  counts = np.asarray(masking.num_masked(jax.random.key(1), 50000, n, "linear"))
  # Each count 1..N is equally likely (probability 1/N).
  freq = np.bincount(counts, minlength=n + 1)[1:] / counts.size
  np.testing.assert_allclose(freq, np.full(n, 1 / n), atol=0.01)


def test_at_least_one_token_masked_even_when_gamma_is_tiny():
  counts = masking.num_masked(jax.random.key(2), 5000, 4, "pow50")
  assert int(counts.min()) == 1


def test_positions_are_uniform():
  n, batch = 8, 40000
  mask = np.asarray(masking.random_mask(jax.random.key(3), batch, n, "linear"))
  per_position = mask.mean(0)
  expected = mask.sum(-1).mean() / n
  np.testing.assert_allclose(per_position, expected, atol=0.01)


def test_rank_mask_exact_count_with_ties():
  scores = jnp.zeros((3, 6))
  mask = masking.rank_mask(scores, jnp.array([0, 2, 6]))
  assert mask.sum(-1).tolist() == [0, 2, 6]


def test_apply_mask_and_determinism():
  tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
  mask = masking.random_mask(jax.random.key(4), 2, 6)
  again = masking.random_mask(jax.random.key(4), 2, 6)
  np.testing.assert_array_equal(mask, again)
  masked = masking.apply_mask(tokens, mask, -1)
  np.testing.assert_array_equal(masked == -1, mask)
  np.testing.assert_array_equal(jnp.where(mask, tokens, masked), tokens)


def test_unknown_schedule_rejected():
  with pytest.raises(ValueError, match="cosine"):
    masking.random_mask(jax.random.key(0), 2, 4, "nope")
