"""Streaming feature statistics: mean and covariance without the features.

FID needs the mean and covariance of 50,000 feature vectors, which arrive a
batch at a time from many devices and processes. Keeping the count, the sum
and the sum of outer products is enough, merges by addition (in any order,
across devices, seeds or processes) and gives exactly the batch statistics
(np.mean, np.cov) up to rounding. The sums are float64: the covariance is
sum_outer / (n - 1) - n / (n - 1) mu mu^T, a difference of large terms that
float32 would ruin; in float64 it agrees with np.cov to ~1e-12 relative
for features whose mean is a few standard deviations from zero. A `Reservoir` may ride along to keep features for
precision/recall.
"""

import copy
from typing import Optional

import numpy as np

from maskgit_jax.evaluation import reservoir as reservoir_lib


class FeatureStats:
  """Count, sum [D] and sum of outer products [D, D] of feature rows.

  Args:
    dim: feature dimension; taken from the first batch when None.
    keep: also keep a uniform random subset of at most this many rows (0
      keeps none), e.g. for precision/recall.
    seed: seeds the subset's choices, so it is deterministic.
  """

  def __init__(self, dim: Optional[int] = None, keep: int = 0,
               seed: int = 0):
    if dim is not None and (not isinstance(dim, (int, np.integer))
                            or dim < 1):
      raise ValueError(f"dim must be a positive integer or None, got "
                       f"{dim!r}.")
    if not isinstance(keep, (int, np.integer)) or keep < 0:
      raise ValueError(f"keep must be a non-negative integer, got {keep!r}.")
    self.count = 0
    self.total: Optional[np.ndarray] = None
    self.total_outer: Optional[np.ndarray] = None
    self.reservoir = (reservoir_lib.Reservoir(keep, seed) if keep else None)
    if dim is not None:
      self._allocate(int(dim))

  def __repr__(self) -> str:
    return f"FeatureStats(count={self.count}, dim={self.dim})"

  @property
  def dim(self) -> Optional[int]:
    return None if self.total is None else self.total.shape[0]

  def _allocate(self, dim: int) -> None:
    self.total = np.zeros((dim,), np.float64)
    self.total_outer = np.zeros((dim, dim), np.float64)

  def update(self, features) -> "FeatureStats":
    """Adds a batch of feature rows [n, D] (numpy or host-readable JAX);
    returns self."""
    batch = np.asarray(features)
    if batch.ndim != 2 or batch.shape[1] == 0:
      raise ValueError(f"features must have shape [batch, dim], got "
                       f"{batch.shape}.")
    if self.dim is None:
      self._allocate(batch.shape[1])
    if batch.shape[1] != self.dim:
      raise ValueError(f"features have dimension {batch.shape[1]}, but "
                       f"these statistics have dimension {self.dim}.")
    batch = batch.astype(np.float64)
    if not np.isfinite(batch).all():
      raise ValueError(f"features have {batch.size - np.isfinite(batch).sum()}"
                       " non-finite entries; they would poison the "
                       "statistics.")
    self.count += batch.shape[0]
    self.total += batch.sum(axis=0)
    self.total_outer += batch.T @ batch
    if self.reservoir is not None:
      self.reservoir.update(batch)
    return self

  def copy(self) -> "FeatureStats":
    return copy.deepcopy(self)

  def merge(self, other: "FeatureStats") -> "FeatureStats":
    """Statistics of both sets of rows (a new object)."""
    if None not in (self.dim, other.dim) and self.dim != other.dim:
      raise ValueError(f"Cannot merge statistics of dimension {self.dim} "
                       f"and {other.dim}.")
    if (self.reservoir is None) != (other.reservoir is None):
      raise ValueError("Cannot merge statistics that keep features with "
                       "statistics that do not; use the same `keep`.")
    merged = FeatureStats()
    merged.count = self.count + other.count
    parts = [s for s in (self, other) if s.total is not None]
    if parts:
      merged.total = sum(s.total for s in parts)
      merged.total_outer = sum(s.total_outer for s in parts)
    if self.reservoir is not None:
      merged.reservoir = self.reservoir.merge(other.reservoir)
    return merged

  @property
  def mu(self) -> np.ndarray:
    """The mean [D], float64."""
    self._require(1)
    return self.total / self.count

  @property
  def sigma(self) -> np.ndarray:
    """The unbiased covariance [D, D] (ddof=1, as np.cov), float64."""
    self._require(2)
    mu = self.total / self.count
    cov = (self.total_outer - self.count * np.outer(mu, mu)) / (
        self.count - 1)
    return 0.5 * (cov + cov.T)

  @property
  def features(self) -> np.ndarray:
    """The kept subset of rows [min(count, keep), D], float32."""
    if self.reservoir is None:
      raise ValueError("These statistics keep no features; create them with "
                       "keep > 0.")
    return self.reservoir.rows

  def _require(self, n: int) -> None:
    if self.count < n:
      raise ValueError(f"Statistics of {self.count} feature rows; at least "
                       f"{n} are needed.")
