"""Inception Score: exp(E_x KL(p(y|x) || p(y))), averaged over splits.

Conventions follow the standard definition (improved-GAN) and the ADM
evaluator: class probabilities are the softmax of the given logits (for the
FID Inception network, its unbiased logits: pool features times the logits
weight, no bias), the samples are cut into 10 consecutive splits, p(y) is
the mean prediction within each split, and the score is the mean and the
(population) standard deviation of the per-split scores. With 50,000
samples the splits are 5,000 each, exactly as the ADM evaluator cuts them.
"""

from typing import NamedTuple

import numpy as np

NUM_SPLITS = 10


class InceptionScore(NamedTuple):
  mean: float
  std: float


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - np.max(logits, axis=1, keepdims=True)
  return shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))


def split_score(log_probs: np.ndarray) -> float:
  """exp(mean KL(p(y|x) || p(y))) of one split, from log p(y|x) [n, C].

  Terms with p(y|x) = 0 contribute 0 (the limit of p log p), so confident
  one-hot predictions stay finite.
  """
  probs = np.exp(log_probs)
  log_marginal = np.log(np.mean(probs, axis=0))
  terms = np.where(probs > 0, probs * (log_probs - log_marginal), 0.0)
  return float(np.exp(np.mean(np.sum(terms, axis=1))))


def inception_score(logits, num_splits: int = NUM_SPLITS) -> InceptionScore:
  """Inception Score (mean, std over `num_splits` splits) of [N, C] logits.

  Split i holds samples [i * N // num_splits, (i + 1) * N // num_splits),
  so every sample counts and split sizes differ by at most one. Computed in
  float64 on the host.
  """
  logits = np.asarray(logits, dtype=np.float64)
  if logits.ndim != 2 or logits.shape[1] < 1:
    raise ValueError(f"logits must have shape [num_samples, num_classes], "
                     f"got shape {logits.shape}.")
  if not isinstance(num_splits, (int, np.integer)) or num_splits < 1:
    raise ValueError(f"num_splits must be a positive integer, got "
                     f"{num_splits!r}.")
  if logits.shape[0] < num_splits:
    raise ValueError(f"{logits.shape[0]} samples cannot fill {num_splits} "
                     "splits; pass at least one sample per split.")
  if not np.isfinite(logits).all():
    raise ValueError(f"logits have {logits.size - np.isfinite(logits).sum()} "
                     "non-finite entries; they must be finite.")
  log_probs = _log_softmax(logits)
  n = logits.shape[0]
  bounds = [i * n // num_splits for i in range(num_splits + 1)]
  scores = np.array([split_score(log_probs[lo:hi])
                     for lo, hi in zip(bounds[:-1], bounds[1:])])
  return InceptionScore(float(np.mean(scores)), float(np.std(scores)))
