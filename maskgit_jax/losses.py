"""Losses and metrics for both stages.

Stage 1 (tokenizer): L1/L2 reconstruction, GAN losses, R1 penalty, PSNR and
codebook statistics. Stage 2 (transformer): cross-entropy and accuracy over
the masked tokens only. The VQ losses live with the quantizer in
models/vqgan.py, the LPIPS distance in models/perceptual.py.

Every function is pure, jit-compatible and returns float32 whatever the input
dtype, so that bfloat16 activations never reach a loss reduction.
"""

import operator
from typing import Callable, Tuple

import jax
import jax.numpy as jnp

GAN_LOSSES: Tuple[str, ...] = ("non-saturating", "hinge")


def _f32(x: jnp.ndarray) -> jnp.ndarray:
  return jnp.asarray(x, jnp.float32)


def l1_loss(x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  """Mean absolute difference over every element."""
  return jnp.mean(jnp.abs(_f32(x) - _f32(y)))


def l2_loss(x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  """Mean squared difference over every element."""
  return jnp.mean(jnp.square(_f32(x) - _f32(y)))


# ----------------------------------------------------------------- GAN losses


def _check_gan_kind(kind: str) -> None:
  if kind not in GAN_LOSSES:
    raise ValueError(f"Unknown GAN loss {kind!r}; valid: {list(GAN_LOSSES)}.")


def discriminator_loss(real_logits: jnp.ndarray, fake_logits: jnp.ndarray,
                       kind: str = "non-saturating") -> jnp.ndarray:
  """Loss of the discriminator, which should score real high and fake low.

  non-saturating: mean softplus(-real) + mean softplus(fake), i.e. the
  sigmoid cross-entropy with labels 1 (real) and 0 (fake); softplus stays
  finite and has bounded gradients for any logit.
  hinge: mean relu(1 - real) + mean relu(1 + fake).
  Real and fake are averaged separately, which equals the mean of their sum
  when both batches have the same shape.
  """
  _check_gan_kind(kind)
  real, fake = _f32(real_logits), _f32(fake_logits)
  if kind == "hinge":
    return jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))
  return jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake))


def generator_loss(fake_logits: jnp.ndarray,
                   kind: str = "non-saturating") -> jnp.ndarray:
  """Loss of the generator, which wants its samples scored as real.

  non-saturating: mean softplus(-fake) = -log sigmoid(fake), whose gradient
  does not vanish while the discriminator still wins (Goodfellow 2014).
  hinge: -mean(fake).
  """
  _check_gan_kind(kind)
  fake = _f32(fake_logits)
  if kind == "hinge":
    return -jnp.mean(fake)
  return jnp.mean(jax.nn.softplus(-fake))


def r1_penalty(discriminator_fn: Callable[[jnp.ndarray], jnp.ndarray],
               images: jnp.ndarray) -> jnp.ndarray:
  """R1 penalty (Mescheder 2018): E_real ||d D(x) / d x||^2.

  Per example, the sum of squared gradients of its logit with respect to its
  own pixels; then the mean over the batch. The cost (gamma, often written
  gamma / 2) is not applied here: the caller multiplies, as the official
  trainer does with its `penalty_cost`.

  The gradient of the summed logits equals the per-example gradients only
  because examples do not interact inside `discriminator_fn`: it must have no
  batch normalisation or other cross-example layers (ours has none).
  """
  total_logit = lambda x: jnp.sum(_f32(discriminator_fn(x)))
  grads = _f32(jax.grad(total_logit)(images))
  per_example = jnp.sum(jnp.square(grads.reshape(grads.shape[0], -1)), axis=-1)
  return jnp.mean(per_example)


# ----------------------------------------------------- masked token modelling


def _check_token_shapes(logits: jnp.ndarray, targets: jnp.ndarray,
                        mask: jnp.ndarray) -> None:
  if logits.ndim != 3:
    raise ValueError(f"logits must be [B, N, V], got shape {logits.shape}.")
  if targets.shape != logits.shape[:2] or mask.shape != logits.shape[:2]:
    raise ValueError(
        f"targets and mask must be [B, N] = {logits.shape[:2]}, got targets "
        f"{targets.shape} and mask {mask.shape}.")


def _masked_mean(values: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """Mean over each example's masked positions, then over the batch.

  Matches the official weighted loss, sum(v * w, -1) / sum(w, -1) then a
  batch mean, whenever every example has a masked position (training masking
  guarantees at least one). An example without any is left out of the batch
  mean instead of turning the result into NaN; with none at all the result is
  0.
  """
  weights = _f32(mask)
  count = jnp.sum(weights, axis=-1)
  total = jnp.sum(_f32(values) * weights, axis=-1)
  per_example = total / jnp.maximum(count, 1.0)
  present = _f32(count > 0)
  return jnp.sum(per_example * present) / jnp.maximum(jnp.sum(present), 1.0)


def masked_cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray,
                         mask: jnp.ndarray,
                         label_smoothing: float = 0.0) -> jnp.ndarray:
  """Cross-entropy of `logits` [B, N, V] against `targets` [B, N] where mask.

  Only positions where `mask` [B, N] is True count; the reduction is
  `_masked_mean`. Label smoothing follows the official convention: the
  target's probability is 1 - ls + ls / V and every other class gets ls / V
  (so the smoothed target still sums to one). Written without a one-hot
  [B, N, V] tensor: -sum_v q_v log p_v = -(1 - ls) log p_t - ls/V sum_v log p_v.
  """
  _check_token_shapes(logits, targets, mask)
  if not 0.0 <= label_smoothing <= 1.0:
    raise ValueError(
        f"label_smoothing must be in [0, 1], got {label_smoothing}.")
  log_probs = jax.nn.log_softmax(_f32(logits), axis=-1)
  target_log_prob = jnp.take_along_axis(
      log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  loss = -target_log_prob
  if label_smoothing > 0.0:
    vocab_size = logits.shape[-1]
    loss = ((1.0 - label_smoothing) * loss -
            label_smoothing / vocab_size * jnp.sum(log_probs, axis=-1))
  return _masked_mean(loss, mask)


def masked_accuracy(logits: jnp.ndarray, targets: jnp.ndarray,
                    mask: jnp.ndarray) -> jnp.ndarray:
  """Top-1 accuracy at the masked positions, reduced like the loss."""
  _check_token_shapes(logits, targets, mask)
  correct = jnp.argmax(logits, axis=-1) == targets.astype(jnp.int32)
  return _masked_mean(correct, mask)


# ----------------------------------------------------------- tokenizer metrics


def psnr(x: jnp.ndarray, y: jnp.ndarray, max_value: float = 1.0) -> jnp.ndarray:
  """Peak signal-to-noise ratio in dB per image, [B] from [B, ...] inputs.

  10 log10(max_value^2 / MSE), the MSE over all non-batch axes; identical
  images give +inf. Clip reconstructions to the valid range first.
  """
  x, y = _f32(x), _f32(y)
  mse = jnp.mean(jnp.square(x - y).reshape(x.shape[0], -1), axis=-1)
  return 10.0 * jnp.log10(max_value**2 / mse)


def _check_codebook_size(codebook_size: int) -> int:
  """Returns the size as a Python int (it fixes a shape, so must be static)."""
  try:
    size = operator.index(codebook_size)
  except TypeError:
    size = 0
  if size < 1:
    raise ValueError(f"codebook_size must be a positive int, got "
                     f"{codebook_size!r}.")
  return size


def code_counts(indices: jnp.ndarray, codebook_size: int) -> jnp.ndarray:
  """Histogram int32 [codebook_size] of a batch of code indices (any shape)."""
  return jnp.bincount(jnp.ravel(indices).astype(jnp.int32),
                      length=_check_codebook_size(codebook_size))


def usage_from_counts(counts: jnp.ndarray) -> jnp.ndarray:
  """Fraction of codes with a non-zero count.

  Takes counts so that a trainer can accumulate histograms over many steps
  and report usage over that window.
  """
  return jnp.mean(_f32(counts > 0))


def perplexity_from_counts(counts: jnp.ndarray) -> jnp.ndarray:
  """exp(entropy) of the code histogram: the effective number of codes used.

  1 when a single code is used, codebook_size when all are equally used.
  Empty codes contribute 0 (0 log 0 = 0), exactly rather than via an epsilon.
  """
  counts = _f32(counts)
  probs = counts / jnp.maximum(jnp.sum(counts), 1.0)
  safe = jnp.where(probs > 0, probs, 1.0)
  return jnp.exp(-jnp.sum(jnp.where(probs > 0, probs * jnp.log(safe), 0.0)))


def codebook_usage(indices: jnp.ndarray, codebook_size: int) -> jnp.ndarray:
  """Fraction of the codebook that appears at least once in `indices`."""
  return usage_from_counts(code_counts(indices, codebook_size))


def codebook_perplexity(indices: jnp.ndarray,
                        codebook_size: int) -> jnp.ndarray:
  """exp of the entropy of the code histogram of `indices`."""
  return perplexity_from_counts(code_counts(indices, codebook_size))
