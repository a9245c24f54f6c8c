"""Feature statistics from every device of every process.

Each process streams the features on its own devices into its own
`FeatureStats`; `merge_across_processes` then sums those, so every process
ends with the statistics of all samples. The transport is
`multihost_utils.process_allgather`, which moves JAX arrays: without
`jax_enable_x64` a float64 array would silently become float32, so 64-bit
data travels bit-cast to uint32 and is cast back on arrival (exact sums,
whatever the x64 setting). The [D, D] sum goes in row chunks, so a gather
holds at most about `CHUNK_BYTES` per process at a time. With one process
nothing is gathered.
"""

from typing import Callable, Optional

import jax
from jax.experimental import multihost_utils
import numpy as np

from maskgit_jax.evaluation import statistics

Allgather = Callable[[np.ndarray], np.ndarray]
# Bytes of the [D, D] sum gathered per process at a time (2048-d float64
# features are 32 MiB in all).
CHUNK_BYTES = 8 * 2**20


def host_allgather(array: np.ndarray) -> np.ndarray:
  """This process's `array` stacked with every other's: [P, *shape], exact
  for any dtype (64-bit types travel as uint32 pairs)."""
  array = np.ascontiguousarray(array)
  if array.dtype.itemsize == 8:
    words = array.view(np.uint32).reshape(*array.shape, 2)
    gathered = np.asarray(multihost_utils.process_allgather(words))
    return np.ascontiguousarray(gathered).view(array.dtype).reshape(
        gathered.shape[0], *array.shape)
  if array.dtype.itemsize > 4:
    raise ValueError(f"host_allgather moves dtypes of at most 8 bytes, got "
                     f"{array.dtype}.")
  return np.asarray(multihost_utils.process_allgather(array))


def local_rows(features) -> np.ndarray:
  """The rows of a (possibly multi-process) batch that this process holds.

  A global `jax.Array` sharded along its batch axis is read from this
  process's devices, one copy of each shard (replicas are skipped, so
  every row is counted by exactly one process). Plain numpy arrays and
  arrays this process holds entirely are returned whole.
  """
  if not isinstance(features, jax.Array) or features.is_fully_addressable:
    return np.asarray(features)
  shards = [s for s in features.addressable_shards if s.replica_id == 0]
  for shard in shards:
    for axis, index in enumerate(shard.index[1:], start=1):
      if (index.start or 0) != 0 or index.stop not in (
          None, features.shape[axis]):
        raise ValueError(f"features of shape {features.shape} are split "
                         f"along axis {axis}; only the batch axis may be "
                         "sharded.")
  shards.sort(key=lambda s: s.index[0].start or 0)
  if not shards:
    return np.zeros((0, *features.shape[1:]), features.dtype)
  return np.concatenate([np.asarray(s.data) for s in shards])


def _sum_across(array: np.ndarray, allgather: Allgather) -> np.ndarray:
  """Elementwise sum over processes, gathering rows in bounded chunks."""
  row_bytes = max(array[:1].nbytes, 1)
  rows = max(1, CHUNK_BYTES // row_bytes)
  return np.concatenate([allgather(array[i:i + rows]).sum(axis=0)
                         for i in range(0, max(array.shape[0], 1), rows)])


def merge_across_processes(
    stats: statistics.FeatureStats,
    allgather: Optional[Allgather] = None,
    process_index: Optional[int] = None) -> statistics.FeatureStats:
  """The statistics of every process's rows, returned on every process.

  Every process must call it (it is a collective). `allgather` and
  `process_index` default to the JAX multi-process ones; passing them lets
  tests simulate processes. With a single process (and no `allgather`) the
  result is a copy of `stats`.
  """
  if allgather is None:
    if jax.process_count() == 1:
      return stats.copy()
    allgather = host_allgather
  if process_index is None:
    process_index = jax.process_index()
  dims = allgather(np.array([stats.dim or 0], np.int64))[:, 0]
  present = np.unique(dims[dims > 0])
  if len(present) > 1:
    raise ValueError(f"Processes hold features of different dimensions "
                     f"{present.tolist()}; they must match.")
  keeps = allgather(np.array(
      [stats.reservoir.capacity if stats.reservoir else 0], np.int64))[:, 0]
  if len(np.unique(keeps)) > 1:
    raise ValueError(f"Processes keep different numbers of features "
                     f"{keeps.tolist()}; use the same `keep` everywhere.")
  merged = statistics.FeatureStats()
  merged.count = int(allgather(np.array([stats.count], np.int64)).sum())
  if len(present):
    dim = int(present[0])
    total = stats.total if stats.total is not None else np.zeros(dim)
    outer = (stats.total_outer if stats.total_outer is not None
             else np.zeros((dim, dim)))
    merged.total = _sum_across(total[None], allgather)[0]
    merged.total_outer = _sum_across(outer, allgather)
  if stats.reservoir is not None:
    merged.reservoir = stats.reservoir.merge_across_processes(
        allgather, process_index)
  return merged
