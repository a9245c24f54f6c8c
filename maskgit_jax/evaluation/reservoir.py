"""A uniform random subset of a stream of feature rows, of bounded size.

Precision/recall needs features themselves, not just their moments, but the
evaluation never holds every image: a reservoir keeps at most `capacity`
rows, each subset of that size equally likely (Algorithm R, vectorised per
batch). While the stream is no longer than `capacity` it keeps every row in
arrival order, so a capacity >= the number of samples means "keep all" (the
ADM evaluator uses all 50,000 generated samples).

Reservoirs merge exactly: a uniform k-subset of A u B takes a
hypergeometric number of rows from A's uniform subset and the rest from
B's. The same rule, with one shared draw, merges the reservoirs of all
processes while each sends only the rows it contributes.

Deterministic: the result depends only on the seed, the rows and the order
and sizes of the batches (and, across processes, the process count).
"""

from typing import Callable, Optional

import numpy as np

# Rows are kept as float32, the precision the distance computations use.
DTYPE = np.float32


class Reservoir:
  """Up to `capacity` uniformly chosen rows of everything `update` saw."""

  def __init__(self, capacity: int, seed: int = 0):
    if not isinstance(capacity, (int, np.integer)) or capacity < 1:
      raise ValueError(f"capacity must be a positive integer, got "
                       f"{capacity!r}.")
    self.capacity = int(capacity)
    self.seed = int(seed)
    self.count = 0  # rows seen
    self._rows: Optional[np.ndarray] = None  # [capacity, D] once D is known
    self._filled = 0
    self._rng = np.random.default_rng(self.seed)

  @property
  def dim(self) -> Optional[int]:
    return None if self._rows is None else self._rows.shape[1]

  @property
  def rows(self) -> np.ndarray:
    """The kept rows, [min(count, capacity), D] float32 (a view)."""
    if self._rows is None:
      raise ValueError("The reservoir is empty: call update() with features "
                       "first.")
    return self._rows[:self._filled]

  def _allocate(self, dim: int) -> None:
    if self._rows is None:
      self._rows = np.zeros((self.capacity, dim), DTYPE)
    elif dim != self._rows.shape[1]:
      raise ValueError(f"Rows of dimension {dim} cannot join a reservoir of "
                       f"dimension {self._rows.shape[1]}.")

  def update(self, rows) -> None:
    """Offers a batch [n, D] of rows to the reservoir."""
    rows = np.asarray(rows, dtype=DTYPE)
    if rows.ndim != 2:
      raise ValueError(f"rows must have shape [n, dim], got {rows.shape}.")
    if rows.shape[0] == 0:
      return
    self._allocate(rows.shape[1])
    # Fill free slots in arrival order; what is left competes for slots.
    take = min(self.capacity - self._filled, rows.shape[0])
    self._rows[self._filled:self._filled + take] = rows[:take]
    self._filled += take
    self.count += take
    rest = rows[take:]
    if rest.shape[0]:
      # Of a uniform k-subset of (seen + rest), Hypergeom(rest, seen, k)
      # rows come from `rest`: they overwrite as many uniform slots.
      new = self._rng.hypergeometric(rest.shape[0], self.count,
                                     self.capacity)
      chosen = self._rng.choice(rest.shape[0], new, replace=False)
      slots = self._rng.choice(self.capacity, new, replace=False)
      self._rows[slots] = rest[np.sort(chosen)]
      self.count += rest.shape[0]

  def _restored(self, count: int, rows: np.ndarray) -> "Reservoir":
    """A reservoir like this one that has seen `count` rows, keeps `rows`."""
    restored = Reservoir(self.capacity, self.seed)
    restored._allocate(rows.shape[1])
    restored._rows[:rows.shape[0]] = rows
    restored._filled = rows.shape[0]
    restored.count = count
    # Later updates draw from a stream tied to the merged state.
    restored._rng = np.random.default_rng([self.seed, count, 1])
    return restored

  def _subset(self, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` uniformly chosen kept rows, in slot order (all of them if
    size is the number kept)."""
    if size == self._filled:
      return self._rows[:size].copy()
    return self._rows[np.sort(rng.choice(self._filled, size, replace=False))]

  def merge(self, other: "Reservoir") -> "Reservoir":
    """A reservoir of both streams, as if `other`'s rows came after."""
    if other.capacity != self.capacity:
      raise ValueError(f"Cannot merge reservoirs of capacity "
                       f"{self.capacity} and {other.capacity}.")
    if None not in (self.dim, other.dim) and self.dim != other.dim:
      raise ValueError(f"Cannot merge reservoirs of dimension {self.dim} "
                       f"and {other.dim}.")
    nonempty = [r for r in (self, other) if r.count]
    if not nonempty:
      return Reservoir(self.capacity, self.seed)
    counts = np.array([r.count for r in nonempty])
    rng = np.random.default_rng([self.seed, self.count, other.count])
    sizes = _contributions(counts, self.capacity, rng)
    rows = np.concatenate([r._subset(int(size), rng)
                           for r, size in zip(nonempty, sizes)])
    return self._restored(int(counts.sum()), rows)

  def merge_across_processes(
      self, allgather: Callable[[np.ndarray], np.ndarray],
      process_index: int) -> "Reservoir":
    """The reservoir of every process's stream, the same on each process.

    `allgather` maps this process's array to the stacked arrays of all
    processes (in process order). One draw, made alike on every process,
    decides how many rows each contributes; each then sends only those,
    padded to the largest contribution.
    """
    counts = allgather(np.array([self.count], np.int64))[:, 0]
    dims = allgather(np.array([self.dim or 0], np.int64))[:, 0]
    present = np.unique(dims[counts > 0])
    if len(present) > 1:
      raise ValueError(f"Processes hold features of different dimensions "
                       f"{present.tolist()}; they must match.")
    if not len(present):
      return Reservoir(self.capacity, self.seed)
    dim, total = int(present[0]), int(counts.sum())
    shared = np.random.default_rng([self.seed, total, 2])
    sizes = _contributions(counts, self.capacity, shared)
    padded = np.zeros((int(sizes.max()), dim), DTYPE)
    if self.count:
      local = np.random.default_rng([self.seed, total, 3, process_index])
      mine = self._subset(int(sizes[process_index]), local)
      padded[:mine.shape[0]] = mine
    gathered = allgather(padded)
    rows = np.concatenate([gathered[p, :size] for p, size in
                           enumerate(sizes)])
    return self._restored(total, rows)


def _contributions(counts: np.ndarray, capacity: int,
                   rng: np.random.Generator) -> np.ndarray:
  """How many rows each stream gives to a uniform `capacity`-subset of all
  streams together (all of every stream if they fit)."""
  if counts.sum() <= capacity:
    return counts.astype(np.int64)
  return rng.multivariate_hypergeometric(counts, capacity).astype(np.int64)
