"""Small datasets held decoded in memory, each record decoded once.

A TFDS array_record source decodes every record it is asked for (a proto
parse and a PNG decode: 0.3-0.5 ms a record on one core of a 2-core CPU).
The demo asks for about 230,000 Fashion-MNIST records (training, the token
cache, the classifier, evaluation), so it decodes the same 70,000 images
again and again. `InMemorySource` reads a split once, in bulk, and then
serves numpy rows: the same records, in the same order, with the same
values, so every pipeline built on it yields the same batches, bit for bit.

`data.in_memory = True` turns it on (`sources.build_source`). A split is
read once per process and shared by every job that process runs (the demo
runs them all in one), and only for records whose fields each have one
shape (Fashion-MNIST; not image folders of mixed sizes).
"""

import threading
from typing import Any, Callable, Dict, Hashable, List

import numpy as np
import tqdm

# Records decoded per bulk read while loading a split.
_CHUNK = 4096

_LOADED: Dict[Hashable, "InMemorySource"] = {}
_LOCK = threading.Lock()


class InMemorySource:
  """A random-access source over decoded columns {field: [N, ...] array}."""

  def __init__(self, columns: Dict[str, np.ndarray], name: str = ""):
    lengths = {key: len(value) for key, value in columns.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"Columns of different lengths: {lengths}.")
    self._columns, self._name = columns, name
    self._length = next(iter(lengths.values()))
    self._derived: Dict[Hashable, Any] = {}
    self._derived_lock = threading.Lock()

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> Dict[str, Any]:
    # Arrays are copied (a transform that writes into its input must not
    # change the dataset); scalars become Python values, as TFDS gives them.
    return {key: np.array(column[index]) if column.ndim > 1
            else column[index].item()
            for key, column in self._columns.items()}

  def derived(self, key: Hashable, compute: Callable[[], Any]) -> Any:
    """`compute()`, run once per `key` for this split and then kept: for
    whole-split arrays that every pass would otherwise redo record by
    record (the evaluation views, `input_pipeline.centre_views`)."""
    with self._derived_lock:
      if key not in self._derived:
        self._derived[key] = compute()
      return self._derived[key]

  @property
  def name(self) -> str:
    return self._name

  @property
  def nbytes(self) -> int:
    return sum(column.nbytes for column in self._columns.values())

  def __repr__(self) -> str:
    return (f"InMemorySource({self._name}, {self._length} records, "
            f"{self.nbytes / 2**20:.1f} MiB)")


def read_columns(source, name: str = "") -> Dict[str, np.ndarray]:
  """Every record of `source`, decoded, as one array per field.

  Raises ValueError naming the field when its values differ in shape.
  """
  if not len(source):
    raise ValueError(f"{name or source!r} has no records to hold in memory.")
  rows: List[Dict[str, Any]] = []
  bulk = getattr(source, "__getitems__", None)
  for start in tqdm.tqdm(range(0, len(source), _CHUNK), unit="chunk",
                         desc=f"reading {name} into memory", leave=False):
    indices = list(range(start, min(start + _CHUNK, len(source))))
    rows.extend(bulk(indices) if bulk else [source[i] for i in indices])
  columns = {}
  for key in rows[0]:
    shapes = {np.shape(row[key]) for row in rows}
    if len(shapes) > 1:
      raise ValueError(
          f"data.in_memory=True needs every record's {key!r} to have one "
          f"shape; {name} has {len(shapes)} (e.g. {sorted(shapes)[:3]}). "
          "Set data.in_memory=False for this dataset.")
    columns[key] = np.stack([np.asarray(row[key]) for row in rows])
  return columns


def load(source, key: Hashable, name: str = "") -> InMemorySource:
  """`source` held in memory, read once per process for each `key`."""
  with _LOCK:
    if key not in _LOADED:
      _LOADED[key] = InMemorySource(read_columns(source, name), name)
    return _LOADED[key]
