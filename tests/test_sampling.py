import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgit_jax import parallel
from maskgit_jax import sampling
from maskgit_jax import schedules

VOCAB = 32


def random_logits_fn(seed=0, vocab=VOCAB):
  """A fixed, input-dependent stand-in for a transformer."""
  table = jax.random.normal(jax.random.key(seed), (vocab + 1, vocab)) * 2.0

  def tokens_to_logits(tokens):
    ids = jnp.where(tokens < 0, vocab, tokens)
    context = jnp.mean(table[ids], axis=1, keepdims=True)
    position = jnp.arange(tokens.shape[1])[None, :, None] * 0.1
    return table[ids] + context + position
  return tokens_to_logits


def run(tokens_to_logits, inputs, seed=0, **kwargs):
  kwargs.setdefault("num_iter", 4)
  fn = jax.jit(lambda x, rng: sampling.decode(tokens_to_logits, x, rng,
                                              **kwargs))
  return fn(inputs, jax.random.key(seed))


def fully_masked(batch, n):
  return jnp.full((batch, n), -1, jnp.int32)


def masked_counts(history):
  return np.asarray(history.remasked.sum(-1))


def test_official_counts_for_fully_masked_n16_t4():
  _, history = run(random_logits_fn(), fully_masked(3, 16),
                   return_history=True)
  np.testing.assert_array_equal(masked_counts(history),
                                [[14, 11, 6, 0]] * 3)


def reference_counts(n0, num_iter, method, start_iter=0):
  """The official rule, evaluated in plain Python."""
  counts, unknown = [], n0
  for t in range(start_iter, num_iter):
    if t == num_iter - 1:
      count = 0
    else:
      gamma = float(schedules.mask_ratio((t + 1) / num_iter, method, n0))
      count = max(1, min(unknown - 1, math.floor(n0 * gamma)))
    counts.append(count)
    unknown = count
  return counts


@pytest.mark.parametrize("n,num_iter,method", [
    (16, 4, "cosine"), (64, 8, "linear"), (10, 12, "cosine"),
    (37, 6, "exp"), (37, 6, "log"), (5, 8, "square"), (100, 10, "pow2.5")])
def test_counts_follow_official_rule(n, num_iter, method):
  _, history = run(random_logits_fn(), fully_masked(2, n), num_iter=num_iter,
                   schedule=method, return_history=True)
  want = reference_counts(n, num_iter, method)
  np.testing.assert_array_equal(masked_counts(history), [want, want])


def test_known_tokens_never_change_and_no_mask_left():
  rng = np.random.default_rng(0)
  inputs = rng.integers(0, VOCAB, (4, 20)).astype(np.int32)
  unknown = rng.random((4, 20)) < 0.6
  unknown[:, 0] = True
  inputs = np.where(unknown, -1, inputs)
  out, history = run(random_logits_fn(), jnp.asarray(inputs), num_iter=6,
                     return_history=True)
  out = np.asarray(out)
  assert out.dtype == np.int32 and out.shape == inputs.shape
  assert out.min() >= 0 and out.max() < VOCAB
  np.testing.assert_array_equal(out[~unknown], inputs[~unknown])
  # Every iteration keeps what an earlier one fixed.
  predicted = np.asarray(history.predicted)
  remasked = np.asarray(history.remasked)
  held = np.where(remasked, -1, predicted)
  for t in range(1, 6):
    fixed = held[:, t - 1] >= 0
    np.testing.assert_array_equal(held[:, t][fixed], held[:, t - 1][fixed])
  np.testing.assert_array_equal(held[:, -1], out)
  # Partially masked rows start from their own unknown count N0.
  for b in range(4):
    want = reference_counts(int(unknown[b].sum()), 6, "cosine")
    np.testing.assert_array_equal(remasked[b].sum(-1), want)


def test_same_rng_same_output_and_different_rng_differs():
  f = random_logits_fn()
  a = run(f, fully_masked(4, 64), seed=1)
  b = run(f, fully_masked(4, 64), seed=1)
  c = run(f, fully_masked(4, 64), seed=2)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_tokens_to_logits_traced_once_in_a_loop():
  calls = []
  inner = random_logits_fn()

  def counting(tokens):
    calls.append(1)
    return inner(tokens)

  run(counting, fully_masked(2, 16), num_iter=12)
  assert len(calls) == 1
  jaxpr = jax.make_jaxpr(lambda x, k: sampling.decode(
      counting, x, k, num_iter=12))(fully_masked(2, 16), jax.random.key(0))
  text = str(jaxpr)
  assert "while" in text or "scan" in text


def test_fixed_lowest_confidence_remasked_without_noise():
  """With choice_temperature=0 the most confident positions are kept."""
  n = 16
  peak = jnp.linspace(1.0, 12.0, n)  # confidence grows with the position

  def tokens_to_logits(tokens):
    logits = jnp.zeros(tokens.shape + (VOCAB,))
    return logits.at[:, :, 3].set(peak[None, :])

  _, history = run(tokens_to_logits, fully_masked(2, n), num_iter=4,
                   choice_temperature=0.0, return_history=True)
  kept_after_first = ~np.asarray(history.remasked[:, 0])
  assert kept_after_first.sum(-1).tolist() == [2, 2]
  assert kept_after_first[:, -2:].all()


def test_start_iter_runs_the_end_of_the_schedule():
  inputs = fully_masked(2, 16)
  out, history = run(random_logits_fn(), inputs, num_iter=4, start_iter=2,
                     return_history=True)
  counts = masked_counts(history)
  np.testing.assert_array_equal(counts[:, 2:], [[6, 0]] * 2)
  np.testing.assert_array_equal(np.asarray(history.predicted[:, :2]),
                                np.repeat(np.asarray(inputs)[:, None], 2, 1))
  assert int((out < 0).sum()) == 0


def assert_close_to_distribution(freq, want, draws):
  """Within 5 binomial standard deviations, per token."""
  tolerance = 5 * np.sqrt(want * (1 - want) / draws) + 1e-5
  assert np.all(np.abs(freq - want) <= tolerance), (freq, want)


def test_sample_categorical_matches_softmax():
  logits = jnp.array([[2.0, 0.0, -1.0, 1.0, -30.0, 0.5]])
  draws = 200_000
  tokens, prob = sampling.sample_categorical(
      jax.random.key(0), jnp.broadcast_to(logits, (draws, 6)), 1.0)
  want = np.asarray(jax.nn.softmax(logits[0]))
  freq = np.bincount(np.asarray(tokens), minlength=6) / draws
  assert_close_to_distribution(freq, want, draws)
  np.testing.assert_allclose(prob, want[np.asarray(tokens)], rtol=1e-6)
  # Temperature sharpens: at T=0.5 the distribution is softmax(2 * logits).
  tokens, _ = sampling.sample_categorical(
      jax.random.key(1), jnp.broadcast_to(logits, (draws, 6)), 0.5)
  want = np.asarray(jax.nn.softmax(2 * logits[0]))
  freq = np.bincount(np.asarray(tokens), minlength=6) / draws
  assert_close_to_distribution(freq, want, draws)


def test_sample_categorical_never_picks_zero_probability():
  logits = jnp.array([[-jnp.inf, 0.0, -jnp.inf, 0.0, -jnp.inf]])
  tokens, _ = sampling.sample_categorical(
      jax.random.key(0), jnp.broadcast_to(logits, (20000, 5)))
  assert set(np.unique(np.asarray(tokens)).tolist()) <= {1, 3}


def test_sample_categorical_across_search_blocks():
  # 100 entries: four search blocks, the last one padded. Zero-probability
  # entries sit on block edges and fill the third block entirely.
  logits = np.random.default_rng(0).normal(size=100).astype(np.float32)
  zero = [0, 31, 32, 63, 99] + list(range(64, 96))
  logits[zero] = -np.inf
  draws = 100_000
  tokens, prob = sampling.sample_categorical(
      jax.random.key(3), jnp.broadcast_to(jnp.asarray(logits), (draws, 100)))
  tokens = np.asarray(tokens)
  want = np.asarray(jax.nn.softmax(jnp.asarray(logits)))
  assert not np.isin(tokens, zero).any()
  assert_close_to_distribution(np.bincount(tokens, minlength=100) / draws,
                               want, draws)
  np.testing.assert_allclose(prob, want[tokens], rtol=1e-5)


def test_sharded_batch_matches_single_device():
  assert jax.device_count() == 8
  f = random_logits_fn()
  rng = np.random.default_rng(0)
  inputs = np.where(rng.random((16, 24)) < 0.7, -1,
                    rng.integers(0, VOCAB, (16, 24))).astype(np.int32)
  single = run(f, jax.device_put(inputs, jax.devices()[0]), num_iter=8)

  mesh = parallel.create_mesh({"data": 4, "fsdp": 2})
  sharding = parallel.batch_sharding(mesh)
  decode = jax.jit(
      lambda x, k: sampling.decode(f, x, k, num_iter=8),
      in_shardings=(sharding, parallel.replicated(mesh)),
      out_shardings=sharding)
  sharded = decode(jax.device_put(inputs, sharding), jax.random.key(0))
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(single))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_iter=0), "num_iter"),
    (dict(num_iter=4, start_iter=4), "start_iter"),
    (dict(num_iter=4, start_iter=-1), "start_iter"),
    (dict(num_iter=4, schedule="cosinus"), "cosinus"),
    (dict(num_iter=4, choice_temperature=-1.0), "choice_temperature"),
])
def test_bad_arguments_are_rejected(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sampling.decode(random_logits_fn(), fully_masked(1, 8),
                    jax.random.key(0), **kwargs)


def test_bad_inputs_are_rejected():
  with pytest.raises(ValueError, match="shape"):
    sampling.decode(random_logits_fn(), jnp.zeros((8,), jnp.int32),
                    jax.random.key(0), num_iter=2)
  with pytest.raises(ValueError, match="integer"):
    sampling.decode(random_logits_fn(), jnp.zeros((1, 8)),
                    jax.random.key(0), num_iter=2)


def test_guidance_schedules_rise_to_the_scale():
  steps = jnp.arange(4)
  np.testing.assert_allclose(sampling.guidance_at(2.0, "linear", steps, 4),
                             [0.5, 1.0, 1.5, 2.0])
  cosine = np.asarray(sampling.guidance_at(2.0, "cosine", steps, 4))
  assert np.all(np.diff(cosine) > 0) and np.isclose(cosine[-1], 2.0)
  assert sampling.guidance_at(2.0, "constant", steps, 4) == 2.0
  with pytest.raises(ValueError, match="constant.*got 'step'"):
    sampling.guidance_at(2.0, "step", steps, 4)


def test_guided_combines_both_halves_in_one_call():
  """cond + scale * (cond - uncond), with the class slot masked in the
  unconditional half, from a single forward pass of twice the batch."""
  inner = random_logits_fn()
  calls = []

  def counting(tokens):
    calls.append(tokens.shape)
    return inner(tokens)

  tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (3, 9)),
                       jnp.int32).at[:, 4:].set(-1)
  guided = sampling.guided(counting, 1.5, "linear", 4)(tokens, jnp.int32(1))
  assert calls == [(6, 9)]
  cond, uncond = inner(tokens), inner(tokens.at[:, 0].set(-1))
  np.testing.assert_allclose(guided, cond + 0.75 * (cond - uncond),
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="guidance_schedule"):
    sampling.guided(inner, 1.0, "cosinus", 4)


def test_guided_decoding_runs_in_the_loop():
  f = sampling.guided(random_logits_fn(), 2.0, "cosine", 4)
  out = run(f, fully_masked(2, 16), pass_step=True)
  assert out.shape == (2, 16) and int((out < 0).sum()) == 0
