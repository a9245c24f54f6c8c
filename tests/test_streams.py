"""Batch slices ("streams") give the same outputs as one whole-batch call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgit_jax import streams
from maskgit_jax.models import transformer as transformer_lib
from maskgit_jax.models import vqgan as vqgan_lib


@pytest.mark.parametrize("batch, backend, expected", [
    (8, "cpu", 4), (6, "cpu", 3), (7, "cpu", 1), (2, "cpu", 2),
    (8, "gpu", 1), (8, "tpu", 1)])
def test_default_streams(batch, backend, expected):
  assert streams.default_streams(batch, backend) == expected


@pytest.mark.parametrize("batch, min_rows, expected", [
    (32, 8, 4), (16, 8, 2), (24, 8, 3), (8, 8, 1), (4, 8, 1), (64, 8, 4)])
def test_default_streams_keep_min_rows_a_slice(batch, min_rows, expected):
  assert streams.default_streams(batch, "cpu", min_rows=min_rows) == expected


def test_transformer_logits_are_unchanged_by_streams():
  model = transformer_lib.MaskGITTransformer(
      codebook_size=16, num_classes=3, num_tokens=8, hidden_size=32,
      num_layers=2, num_heads=4, mlp_dim=64)
  rng = np.random.default_rng(0)
  tokens = rng.integers(-1, 16, (8, 9)).astype(np.int32)
  tokens[:, 0] = 16 + rng.integers(0, 3, 8)
  params = jax.jit(model.init)(jax.random.key(0), tokens)
  whole = jax.jit(model.apply)(params, tokens)
  sliced = jax.jit(lambda p, t: streams.in_streams(
      lambda x: model.apply(p, x), t, num_streams=4))(params, tokens)
  np.testing.assert_allclose(sliced, whole, rtol=1e-5, atol=1e-5)


def test_pixels_and_pytrees_are_unchanged_by_streams():
  model = vqgan_lib.VQGAN(filters=8, channel_multipliers=(1, 2),
                          num_res_blocks=1, embedding_dim=4,
                          codebook_size=16, num_groups=4)
  images = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3))
  # Jitted: run eagerly, each op of a model compiles on its own.
  params = jax.jit(model.init)(jax.random.key(0), images)
  indices = jax.jit(lambda x: model.apply(
      params, x, method=model.encode_to_indices))(images)
  decode = lambda i: model.apply(params, i, method=model.decode_from_indices)
  whole = jax.jit(decode)(indices)
  pair = jax.jit(lambda i: streams.in_streams(
      lambda j: (decode(j), j + 1), i, num_streams=2))(indices)
  np.testing.assert_allclose(pair[0], whole, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(pair[1], indices + 1)


def test_indivisible_batch_is_rejected():
  with pytest.raises(ValueError, match="batch 6 .* 4 streams"):
    streams.in_streams(lambda x: x, jnp.zeros((6, 2)), num_streams=4)


def test_slice_k_holds_every_nth_row():
  # Each slice reports its own row total: rows k, k + 2, ... share one.
  rows = jnp.arange(8.0)[:, None]
  totals = streams.in_streams(
      lambda x: jnp.broadcast_to(jnp.sum(x), x.shape), rows, num_streams=2)
  np.testing.assert_array_equal(totals[:, 0], [12, 16] * 4)


def test_each_stream_draws_with_its_own_key():
  rng = jax.random.key(7)
  noisy = lambda x, rng: x + jax.random.uniform(rng, x.shape)
  rows = jnp.zeros((4, 3))
  sliced = streams.in_streams(noisy, rows, num_streams=2, rng=rng)
  for k in range(2):
    np.testing.assert_array_equal(
        sliced[k::2], jax.random.uniform(jax.random.fold_in(rng, k), (2, 3)))
  single = streams.in_streams(noisy, rows, num_streams=1, rng=rng)
  np.testing.assert_array_equal(single, jax.random.uniform(rng, (4, 3)))
