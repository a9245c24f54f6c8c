"""Class-conditional generation in batches: what the eval job and the sample
grids drawn during training share.

A whole ImageNet grid (1,000 classes x 4) or 50,000 evaluation samples never
fit in one jitted call, so classes go through `Pipeline.generate` in batches
of a fixed size (the last one padded, so one program serves them all),
split over this process's devices, with a seed per batch derived from the
run's seed: the same seed gives the same images whatever is drawn after.
"""

from typing import Any, Dict, Iterator, Optional, Tuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def balanced_class_ids(num_samples: int, num_classes: int,
                       seed: int = 0) -> np.ndarray:
  """`num_samples` class ids, each class within one of the others' count,
  in a seeded random order (so any prefix is nearly balanced too)."""
  if num_samples < 1 or num_classes < 1:
    raise ValueError(f"num_samples={num_samples} and num_classes="
                     f"{num_classes} must both be >= 1.")
  ids = np.arange(num_samples) % num_classes
  return np.random.default_rng(seed).permutation(ids).astype(np.int32)


def batch_seed(seed: int, index: int) -> int:
  """The sampling seed of batch `index`: a pure function of both."""
  return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def local_batch_sharding(batch_size: int) -> Optional[NamedSharding]:
  """A sharding of the batch over this process's devices, or None when
  there is one device or the batch does not divide evenly."""
  devices = jax.local_devices()
  if len(devices) == 1 or batch_size % len(devices):
    return None
  mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
  return NamedSharding(mesh, P("batch"))


def generate_in_batches(pipe: Any, class_ids: np.ndarray, *, batch_size: int,
                        seed: int, sampling: Optional[Dict[str, Any]] = None,
                        first_batch: int = 0, batch_stride: int = 1
                        ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """Yields (uint8 images [b, H, W, C], class ids [b]) over `class_ids`.

  `sampling` holds `Pipeline.generate` keywords (num_iter,
  choice_temperature, guidance_scale, schedule, ...). Every batch has
  `batch_size` rows on device (the last is padded and trimmed), so the
  decoder compiles once. When `class_ids` are one process's share of a
  larger job (its batches first_batch, first_batch + batch_stride, ...),
  each batch is seeded by its index in the whole job, so no two processes
  draw the same noise and the images equal a single process's.
  """
  class_ids = np.asarray(class_ids, np.int32).reshape(-1)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  sharding = local_batch_sharding(batch_size)
  for index, start in enumerate(range(0, len(class_ids), batch_size)):
    labels = class_ids[start:start + batch_size]
    padded = np.concatenate(
        [labels, np.full(batch_size - len(labels), labels[0], np.int32)])
    job_index = first_batch + index * batch_stride
    images = pipe.generate(padded, seed=batch_seed(seed, job_index),
                           sharding=sharding, **(sampling or {}))
    yield images[:len(labels)], labels


def process_share(num_samples: int, batch_size: int) -> np.ndarray:
  """The sample positions in this process's whole batches of a job (round
  robin: process p takes batches p, p + P, p + 2P, ...)."""
  positions = np.arange(num_samples)
  batches = [positions[i:i + batch_size]
             for i in range(0, num_samples, batch_size)]
  mine = batches[jax.process_index()::jax.process_count()]
  return np.concatenate(mine) if mine else positions[:0]


def gather_rows(rows: np.ndarray) -> np.ndarray:
  """Every process's rows, process 0's first, on every process (the
  processes may hold different numbers of rows)."""
  if jax.process_count() == 1:
    return rows
  from jax.experimental import multihost_utils
  counts = multihost_utils.process_allgather(np.int32(len(rows)))
  padded = np.zeros((int(np.max(counts)),) + rows.shape[1:], rows.dtype)
  padded[:len(rows)] = rows
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return np.concatenate([g[:n] for g, n in zip(gathered, counts)])


def generate_all(pipe: Any, class_ids: np.ndarray, *, batch_size: int,
                 seed: int, sampling: Optional[Dict[str, Any]] = None
                 ) -> np.ndarray:
  """uint8 images of all `class_ids`, in order, on every process: each
  process generates its share of the batches on its own devices (a job
  with fewer batches than processes generates them all everywhere)."""
  class_ids = np.asarray(class_ids, np.int32).reshape(-1)
  num_batches = -(-len(class_ids) // batch_size)
  if jax.process_count() == 1 or num_batches < jax.process_count():
    return np.concatenate([images for images, _ in generate_in_batches(
        pipe, class_ids, batch_size=batch_size, seed=seed,
        sampling=sampling)])
  mine = process_share(len(class_ids), batch_size)
  images = np.concatenate([images for images, _ in generate_in_batches(
      pipe, class_ids[mine], batch_size=batch_size, seed=seed,
      sampling=sampling, first_batch=jax.process_index(),
      batch_stride=jax.process_count())])
  return gather_rows(images)[np.argsort(gather_rows(mine))]
