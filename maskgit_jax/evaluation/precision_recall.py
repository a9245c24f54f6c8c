"""Improved precision and recall (Kynkaanniemi et al., 2019).

Each set of features estimates a manifold: the union of balls around its
points, each ball's radius the distance to the point's k-th nearest
neighbour in the same set, the point itself excluded (k = 3). Precision is
the fraction of generated points inside the real manifold (fidelity);
recall the fraction of real points inside the generated one (coverage).
This is what the ADM evaluator computes.

Distances are squared Euclidean in float32 (comparing squares is comparing
distances), computed at full matmul precision (no bf16/TF32 passes) on the
default JAX device, one `block_size` x `block_size` tile at a time: memory
holds the features and a single tile, never the N x N matrix (50k x 50k
float32 would be 10 GB). Each tile shape compiles once.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NUM_NEIGHBOURS = 3
# Rows and columns per distance tile: 10,000^2 float32 is 400 MB.
BLOCK_SIZE = 10_000


class PrecisionRecall(NamedTuple):
  precision: float
  recall: float


def _check_features(name: str, features) -> np.ndarray:
  array = np.asarray(features, dtype=np.float32)
  if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
    raise ValueError(f"{name} must have shape [num_points, dim] with both "
                     f"sizes positive, got shape {array.shape}.")
  if not np.isfinite(array).all():
    raise ValueError(f"{name} has {array.size - np.isfinite(array).sum()} "
                     "non-finite entries; features must be finite.")
  return array


def _check_positive_int(name: str, value) -> int:
  if not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  return int(value)


def _pad_rows(array: np.ndarray, block: int) -> jnp.ndarray:
  """Zero rows up to a multiple of `block`, so every tile has one shape."""
  padded = -array.shape[0] % block
  return jnp.asarray(np.pad(array, ((0, padded), (0, 0))))


def _squared_distances(rows: jnp.ndarray, cols: jnp.ndarray) -> jnp.ndarray:
  cross = jnp.dot(rows, cols.T, precision=jax.lax.Precision.HIGHEST)
  squared = (jnp.sum(rows * rows, axis=1)[:, None] - 2.0 * cross
             + jnp.sum(cols * cols, axis=1)[None, :])
  return jnp.maximum(squared, 0.0)


@functools.partial(jax.jit, static_argnames=("k", "block"))
def _kth_neighbour_tile(points, num_points, start, *, k: int, block: int):
  """Squared distance from rows [start, start + block) to their k-th
  nearest neighbour among the first `num_points` points, self excluded."""
  rows = jax.lax.dynamic_slice_in_dim(points, start, block)
  row_ids = start + jnp.arange(block)

  def scan_columns(j, nearest):
    cols = jax.lax.dynamic_slice_in_dim(points, j * block, block)
    col_ids = j * block + jnp.arange(block)
    excluded = ((col_ids[None, :] >= num_points) |
                (col_ids[None, :] == row_ids[:, None]))
    distances = jnp.where(excluded, jnp.inf,
                          _squared_distances(rows, cols))
    tile_nearest = -jax.lax.top_k(-distances, min(k, block))[0]
    merged = jnp.concatenate([nearest, tile_nearest], axis=1)
    return -jax.lax.top_k(-merged, k)[0]

  nearest = jax.lax.fori_loop(0, points.shape[0] // block, scan_columns,
                              jnp.full((block, k), jnp.inf, points.dtype))
  return nearest[:, k - 1]


@functools.partial(jax.jit, static_argnames=("block",))
def _covered_tile(queries, start, points, radii, *, block: int):
  """Whether each query in [start, start + block) lies in some ball
  (squared radius `radii`; padding has radius -inf, covering nothing)."""
  rows = jax.lax.dynamic_slice_in_dim(queries, start, block)

  def scan_columns(j, covered):
    cols = jax.lax.dynamic_slice_in_dim(points, j * block, block)
    ball = jax.lax.dynamic_slice_in_dim(radii, j * block, block)
    inside = _squared_distances(rows, cols) <= ball[None, :]
    return covered | jnp.any(inside, axis=1)

  return jax.lax.fori_loop(0, points.shape[0] // block, scan_columns,
                           jnp.zeros((block,), bool))


def manifold_radii(features, k: int = NUM_NEIGHBOURS,
                   block_size: int = BLOCK_SIZE) -> np.ndarray:
  """Squared distance of each point to its k-th nearest neighbour in the
  same set, the point itself excluded (exact duplicates count as
  neighbours at distance 0). Returns float32 [N]."""
  features = _check_features("features", features)
  k = _check_positive_int("k", k)
  block = min(_check_positive_int("block_size", block_size),
              features.shape[0])
  if features.shape[0] <= k:
    raise ValueError(f"{features.shape[0]} points have no {k}-th nearest "
                     f"neighbour besides themselves; pass more than {k}.")
  points = _pad_rows(features, block)
  radii = [_kth_neighbour_tile(points, features.shape[0], start, k=k,
                               block=block)
           for start in range(0, features.shape[0], block)]
  return np.asarray(jnp.concatenate(radii))[:features.shape[0]]


def coverage(queries, points, radii, block_size: int = BLOCK_SIZE) -> float:
  """Fraction of `queries` inside the union of balls around `points` with
  squared radii `radii` (as from `manifold_radii`)."""
  queries = _check_features("queries", queries)
  points = _check_features("points", points)
  if queries.shape[1] != points.shape[1]:
    raise ValueError(f"queries have dimension {queries.shape[1]} but points "
                     f"have {points.shape[1]}; they must match.")
  radii = np.asarray(radii, dtype=np.float32)
  if radii.shape != (points.shape[0],):
    raise ValueError(f"radii must have shape ({points.shape[0]},), one per "
                     f"point, got {radii.shape}.")
  block = min(_check_positive_int("block_size", block_size),
              max(queries.shape[0], points.shape[0]))
  padded_radii = np.full(-points.shape[0] % block + points.shape[0],
                         -np.inf, np.float32)
  padded_radii[:points.shape[0]] = radii
  query_rows = _pad_rows(queries, block)
  point_rows, ball = _pad_rows(points, block), jnp.asarray(padded_radii)
  covered = [_covered_tile(query_rows, start, point_rows, ball, block=block)
             for start in range(0, queries.shape[0], block)]
  return float(np.mean(np.asarray(jnp.concatenate(covered))
                       [:queries.shape[0]]))


def precision_recall(real_features, fake_features, k: int = NUM_NEIGHBOURS,
                     block_size: int = BLOCK_SIZE) -> PrecisionRecall:
  """Improved precision and recall of generated features against real ones.

  Args:
    real_features: [N_real, D] features of real images (the ADM reference
      batch uses 10,000).
    fake_features: [N_fake, D] features of generated images.
    k: the neighbour that sets each ball's radius (3 in the paper and ADM).
    block_size: rows and columns per distance tile; the distances in
      memory at once are one block_size^2 float32 tile (400 MB at the
      default 10,000). Results do not depend on it.
  """
  real = _check_features("real_features", real_features)
  fake = _check_features("fake_features", fake_features)
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"real_features have dimension {real.shape[1]} but "
                     f"fake_features have {fake.shape[1]}; they must match.")
  real_radii = manifold_radii(real, k, block_size)
  fake_radii = manifold_radii(fake, k, block_size)
  return PrecisionRecall(
      precision=coverage(fake, real, real_radii, block_size),
      recall=coverage(real, fake, fake_radii, block_size))
