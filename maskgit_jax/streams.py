"""Run a batched function as independent batch slices inside one jit.

On XLA:CPU some ops of a batch run on one core: the attention of a whole
batch is one single-threaded YNNPACK fusion, a GroupNorm statistic one
reduction. Slicing the batch into independent "streams" lets the runtime run
the slices side by side on all cores, while the large GEMMs stay
multi-threaded. Each example is computed exactly as before (the slices never
mix), so outputs are unchanged. On accelerators slicing only shrinks the
matmuls, so the default there is a single stream.
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

CPU_STREAMS = 4


def default_streams(batch_size: int, backend: Optional[str] = None,
                    limit: int = CPU_STREAMS, min_rows: int = 1) -> int:
  """The largest divisor of `batch_size` up to `limit` on CPU, else 1.

  With `min_rows`, each slice keeps at least that many rows (or the batch
  runs whole): slicing a tiny batch gains no parallelism worth its extra
  ops.
  """
  if (backend or jax.default_backend()) != "cpu":
    return 1
  limit = max(1, min(limit, batch_size // min_rows))
  return max(n for n in range(1, limit + 1) if batch_size % n == 0)


def split(tree: Any, num: int) -> Any:
  """[B, ...] leaves -> [num, B / num, ...]; slice k holds rows k, k + num,
  k + 2 num, ... A batch sharded over devices in contiguous blocks keeps
  every slice on all of them (when B is divisible by num x devices)."""
  def one(x):
    rows, rest = divmod(x.shape[0], num)
    if rest:
      raise ValueError(f"A batch of {x.shape[0]} rows cannot be split into "
                       f"{num} equal slices.")
    return jnp.swapaxes(x.reshape((rows, num) + x.shape[1:]), 0, 1)
  return jax.tree.map(one, tree)


def merge(tree: Any) -> Any:
  """The inverse of `split`: [num, B / num, ...] -> [B, ...]."""
  return jax.tree.map(
      lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:]), tree)


def in_streams(fn: Callable, *arrays: jnp.ndarray,
               num_streams: Optional[int] = None,
               rng: Optional[jax.Array] = None):
  """fn(*arrays), computed as `num_streams` slices of the leading axis.

  `fn` must treat examples independently (no batch statistics). Outputs are
  any pytree of arrays with the batch axis first. The slices are `split`'s.
  With `rng`, fn is called as fn(*slices, rng=key): slice k gets
  fold_in(rng, k) (a single stream gets rng itself), so random draws such
  as dropout differ between slices.
  """
  batch = arrays[0].shape[0]
  num_streams = num_streams or default_streams(batch)
  if batch % num_streams:
    raise ValueError(f"batch {batch} is not divisible into {num_streams} "
                     "streams.")

  def call(parts, k):
    if rng is None:
      return fn(*parts)
    return fn(*parts, rng=rng if num_streams == 1 else
              jax.random.fold_in(rng, k))

  if num_streams == 1:
    return call(arrays, 0)
  slices = split(arrays, num_streams)
  outputs = [call([x[k] for x in slices], k) for k in range(num_streams)]
  return merge(jax.tree.map(lambda *xs: jnp.stack(xs), *outputs))
