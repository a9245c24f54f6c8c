"""Run a batched function as independent batch slices inside one jit.

On XLA:CPU some ops of a batch run on one core: the attention of a whole
batch is one single-threaded YNNPACK fusion, a GroupNorm statistic one
reduction. Slicing the batch into independent "streams" lets the runtime run
the slices side by side on all cores, while the large GEMMs stay
multi-threaded. Each example is computed exactly as before (the slices never
mix), so outputs are unchanged. On accelerators slicing only shrinks the
matmuls, so the default there is a single stream.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp

CPU_STREAMS = 4


def default_streams(batch_size: int, backend: Optional[str] = None) -> int:
  """The largest divisor of `batch_size` up to CPU_STREAMS on CPU, else 1."""
  if (backend or jax.default_backend()) != "cpu":
    return 1
  return max(n for n in range(1, CPU_STREAMS + 1) if batch_size % n == 0)


def in_streams(fn: Callable, *arrays: jnp.ndarray,
               num_streams: Optional[int] = None):
  """fn(*arrays), computed as `num_streams` slices of the leading axis.

  `fn` must treat examples independently (no batch statistics). Outputs are
  any pytree of arrays with the batch axis first.
  """
  batch = arrays[0].shape[0]
  num_streams = num_streams or default_streams(batch)
  if num_streams == 1:
    return fn(*arrays)
  if batch % num_streams:
    raise ValueError(f"batch {batch} is not divisible into {num_streams} "
                     "streams.")
  slices = zip(*(jnp.split(x, num_streams, axis=0) for x in arrays))
  outputs = [fn(*parts) for parts in slices]
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *outputs)
