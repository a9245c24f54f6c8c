import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgit_jax import losses
from maskgit_jax.models import discriminator as discriminator_lib

RNG = np.random.default_rng(0)


def test_reconstruction_losses_are_float32_means():
  x = RNG.normal(size=(2, 4, 4, 3)).astype(np.float32)
  y = RNG.normal(size=(2, 4, 4, 3)).astype(np.float32)
  np.testing.assert_allclose(losses.l1_loss(x, y), np.mean(np.abs(x - y)),
                             rtol=1e-6)
  np.testing.assert_allclose(losses.l2_loss(x, y), np.mean((x - y)**2),
                             rtol=1e-6)
  for fn in (losses.l1_loss, losses.l2_loss):
    out = fn(jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16))
    assert out.dtype == jnp.float32 and out.shape == ()


# ----------------------------------------------------------------- GAN losses


def test_gan_losses_at_zero_logits():
  zeros = jnp.zeros((4, 1))
  log2 = math.log(2.0)
  assert losses.discriminator_loss(zeros, zeros) == pytest.approx(2 * log2)
  assert losses.generator_loss(zeros) == pytest.approx(log2)
  assert losses.discriminator_loss(zeros, zeros, "hinge") == pytest.approx(2.0)
  assert losses.generator_loss(zeros, "hinge") == pytest.approx(0.0)


def test_gan_losses_match_closed_forms():
  real = RNG.normal(size=(8, 1)).astype(np.float32) * 3
  fake = RNG.normal(size=(8, 1)).astype(np.float32) * 3
  sigmoid = lambda z: 1 / (1 + np.exp(-z))
  np.testing.assert_allclose(
      losses.discriminator_loss(real, fake, "non-saturating"),
      np.mean(-np.log(sigmoid(real)) - np.log(1 - sigmoid(fake))), rtol=1e-5)
  np.testing.assert_allclose(losses.generator_loss(fake, "non-saturating"),
                             np.mean(-np.log(sigmoid(fake))), rtol=1e-5)
  np.testing.assert_allclose(
      losses.discriminator_loss(real, fake, "hinge"),
      np.mean(np.maximum(0, 1 - real) + np.maximum(0, 1 + fake)), rtol=1e-5)
  np.testing.assert_allclose(losses.generator_loss(fake, "hinge"),
                             -np.mean(fake), rtol=1e-5)


def test_gan_losses_are_stable_at_large_logits():
  big = jnp.full((3, 1), 1e4)
  # Confident and right: zero loss. Confident and wrong: linear in the logit.
  assert losses.discriminator_loss(big, -big) == 0.0
  np.testing.assert_allclose(losses.discriminator_loss(-big, big), 2e4)
  np.testing.assert_allclose(losses.generator_loss(-big), 1e4)
  assert losses.generator_loss(big) == 0.0
  # Non-saturating: the generator's gradient stays at -1/B, not 0 or NaN.
  grad = jax.grad(losses.generator_loss)(-big)
  np.testing.assert_allclose(grad, np.full((3, 1), -1 / 3), rtol=1e-6)
  grads = jax.grad(losses.discriminator_loss, argnums=(0, 1))(-big, big)
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_unknown_gan_loss_lists_valid_kinds():
  with pytest.raises(ValueError, match="non-saturating.*hinge"):
    losses.generator_loss(jnp.zeros(2), "wasserstein")
  with pytest.raises(ValueError, match="wasserstein"):
    losses.discriminator_loss(jnp.zeros(2), jnp.zeros(2), "wasserstein")


# ------------------------------------------------------------------------- R1


def test_r1_of_linear_discriminator_is_squared_weight_norm():
  w = jnp.asarray(RNG.normal(size=(4, 4, 3)), jnp.float32)
  linear_d = lambda x, w=w: jnp.sum(x * w, axis=(1, 2, 3))[:, None] + 0.5
  images = jnp.asarray(RNG.uniform(size=(5, 4, 4, 3)), jnp.float32)
  np.testing.assert_allclose(losses.r1_penalty(linear_d, images),
                             jnp.sum(w**2), rtol=1e-5)
  # It is differentiable in the discriminator's parameters: d||w||^2/dw = 2w.
  grad = jax.grad(lambda v: losses.r1_penalty(
      lambda x: linear_d(x, v), images))(w)
  np.testing.assert_allclose(grad, 2 * w, rtol=1e-5)


def test_r1_of_quadratic_discriminator_averages_per_example_norms():
  # D(x) = sum(x^2): gradient 2x, so the penalty is mean_b 4 ||x_b||^2.
  images = RNG.normal(size=(3, 2, 2, 1)).astype(np.float32)
  quadratic_d = lambda x: jnp.sum(x**2, axis=(1, 2, 3))
  want = np.mean(4 * np.sum(images.reshape(3, -1)**2, axis=-1))
  np.testing.assert_allclose(losses.r1_penalty(quadratic_d, images), want,
                             rtol=1e-5)


def test_r1_with_our_discriminator_matches_per_example_gradients():
  disc = discriminator_lib.Discriminator(image_size=8, max_filters=16)
  images = jnp.asarray(RNG.uniform(size=(3, 8, 8, 3)), jnp.float32)
  params = disc.init(jax.random.key(0), images)["params"]
  apply = lambda x: disc.apply({"params": params}, x)
  one = lambda x: apply(x[None])[0, 0]
  grads = jax.jit(jax.vmap(jax.grad(one)))(images)
  want = jnp.mean(jnp.sum(grads.reshape(3, -1)**2, axis=-1))
  got = jax.jit(lambda x: losses.r1_penalty(apply, x))(images)
  np.testing.assert_allclose(got, want, rtol=1e-4)


# ---------------------------------------------------- masked cross-entropy


def reference_masked_ce(logits, targets, mask, label_smoothing):
  """The official weighted loss, in NumPy."""
  vocab = logits.shape[-1]
  one_hot = np.eye(vocab)[targets]
  soft = one_hot * (1 - label_smoothing) + label_smoothing / vocab
  z = logits - logits.max(-1, keepdims=True)
  log_probs = z - np.log(np.exp(z).sum(-1, keepdims=True))
  loss = -np.sum(soft * log_probs, axis=-1)
  w = mask.astype(np.float64)
  return np.mean(np.sum(loss * w, -1) / np.sum(w, -1))


def token_batch(b=3, n=6, v=5):
  logits = RNG.normal(size=(b, n, v)).astype(np.float32) * 2
  targets = RNG.integers(0, v, size=(b, n)).astype(np.int32)
  mask = RNG.uniform(size=(b, n)) < 0.5
  mask[:, 0] = True  # at least one per example, like training masking
  return logits, targets, mask


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_masked_cross_entropy_matches_reference(label_smoothing):
  logits, targets, mask = token_batch()
  got = losses.masked_cross_entropy(logits, targets, mask, label_smoothing)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(
      got, reference_masked_ce(logits, targets, mask, label_smoothing),
      rtol=1e-5)


def test_smoothed_target_probabilities():
  # The loss is -sum_v q_v log p_v with q = 1 - ls + ls/V at the target and
  # ls/V elsewhere; distinct log-probs make each weight visible.
  v, ls = 4, 0.2
  logits = np.array([[[0.0, 1.0, 5.0, -3.0]]], np.float32)
  targets = np.array([[1]], np.int32)
  mask = np.ones((1, 1), bool)
  log_p = jax.nn.log_softmax(jnp.asarray(logits))[0, 0]
  on, off = 1 - ls + ls / v, ls / v
  want = -(on * log_p[1] + off * (log_p[0] + log_p[2] + log_p[3]))
  np.testing.assert_allclose(
      losses.masked_cross_entropy(logits, targets, mask, ls), want, rtol=1e-5)


def test_masked_cross_entropy_ignores_unmasked_positions():
  logits, targets, mask = token_batch()
  changed_logits = np.where(mask[..., None], logits, 100.0 * RNG.normal(
      size=logits.shape)).astype(np.float32)
  changed_targets = np.where(mask, targets, 0).astype(np.int32)
  base = losses.masked_cross_entropy(logits, targets, mask, 0.1)
  np.testing.assert_allclose(
      losses.masked_cross_entropy(changed_logits, changed_targets, mask, 0.1),
      base, rtol=1e-6)
  grad = jax.grad(losses.masked_cross_entropy)(jnp.asarray(logits), targets,
                                               mask)
  assert np.all(np.asarray(grad)[~mask] == 0.0)


def test_masked_cross_entropy_of_uniform_logits_is_log_vocab():
  logits = np.zeros((2, 3, 7), np.float32)
  targets = np.zeros((2, 3), np.int32)
  mask = np.array([[True, False, False], [True, True, True]])
  np.testing.assert_allclose(losses.masked_cross_entropy(logits, targets, mask),
                             math.log(7), rtol=1e-6)


def test_examples_without_masked_tokens_do_not_give_nan():
  logits, targets, mask = token_batch()
  mask[1] = False
  got = losses.masked_cross_entropy(logits, targets, mask)
  keep = [0, 2]
  np.testing.assert_allclose(got, reference_masked_ce(
      logits[keep], targets[keep], mask[keep], 0.0), rtol=1e-5)
  assert losses.masked_cross_entropy(logits, targets,
                                     np.zeros_like(mask)) == 0.0


def test_masked_accuracy_counts_masked_positions_only():
  logits = np.zeros((2, 4, 3), np.float32)
  logits[..., 1] = 1.0  # predicts class 1 everywhere
  targets = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], np.int32)
  mask = np.array([[True, False, True, False], [True, True, True, True]])
  # Example 0: 1 of 2 masked right; example 1: 1 of 4 -> mean(0.5, 0.25).
  np.testing.assert_allclose(losses.masked_accuracy(logits, targets, mask),
                             0.375, rtol=1e-6)


def test_token_losses_reject_bad_shapes():
  logits, targets, mask = token_batch()
  with pytest.raises(ValueError, match="targets and mask"):
    losses.masked_cross_entropy(logits, targets[:, :-1], mask)
  with pytest.raises(ValueError, match=r"\[B, N, V\]"):
    losses.masked_accuracy(logits[0], targets, mask)
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.masked_cross_entropy(logits, targets, mask, 1.5)


def test_masked_cross_entropy_jits():
  logits, targets, mask = token_batch()
  fn = jax.jit(losses.masked_cross_entropy, static_argnums=3)
  np.testing.assert_allclose(fn(logits, targets, mask, 0.1),
                             reference_masked_ce(logits, targets, mask, 0.1),
                             rtol=1e-5)


# ----------------------------------------------------------- tokenizer metrics


def test_psnr_of_known_mse():
  x = RNG.uniform(size=(3, 4, 4, 3)).astype(np.float32)
  offsets = np.array([0.1, 0.01, 0.5], np.float32)[:, None, None, None]
  got = losses.psnr(x + offsets, x)
  assert got.shape == (3,)
  np.testing.assert_allclose(got, [20.0, 40.0, -10 * math.log10(0.25)],
                             rtol=1e-4)
  np.testing.assert_allclose(losses.psnr(255 * (x + offsets), 255 * x, 255.0),
                             got, rtol=1e-4)
  assert np.isinf(losses.psnr(x, x)).all()


def test_codebook_usage_and_perplexity():
  half = np.array([[0, 0], [1, 1]])
  assert losses.codebook_usage(half, 4) == pytest.approx(0.5)
  assert losses.codebook_perplexity(half, 4) == pytest.approx(2.0)
  single = np.full((2, 3, 3), 5)
  assert losses.codebook_usage(single, 8) == pytest.approx(1 / 8)
  assert losses.codebook_perplexity(single, 8) == pytest.approx(1.0)
  every = np.arange(16).reshape(4, 4)
  assert losses.codebook_usage(every, 16) == pytest.approx(1.0)
  assert losses.codebook_perplexity(every, 16) == pytest.approx(16.0, rel=1e-5)
  # Non-uniform: p = (3/4, 1/4) -> exp(entropy).
  skewed = np.array([0, 0, 0, 1])
  entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
  assert losses.codebook_perplexity(skewed, 4) == pytest.approx(
      math.exp(entropy), rel=1e-5)


def test_codebook_stats_from_accumulated_counts():
  counts = (losses.code_counts(np.array([0, 1]), 4) +
            losses.code_counts(np.array([1, 2]), 4))
  np.testing.assert_array_equal(counts, [1, 2, 1, 0])
  assert losses.usage_from_counts(counts) == pytest.approx(0.75)
  usage = jax.jit(losses.codebook_usage, static_argnums=1)(np.array([3, 3]), 4)
  assert usage == pytest.approx(0.25)
  with pytest.raises(ValueError, match="codebook_size"):
    losses.codebook_usage(np.array([0]), 0)
