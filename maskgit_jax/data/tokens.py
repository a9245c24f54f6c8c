"""Token cache: a dataset's tokenizer codes, written once, read by stage 2.

A token dataset is a directory of plain files (never pickle):

  tokens.npy     int32 [M, V, h, w]  codebook indices: V views (crops,
                                     mirror images) of each of M images
  labels.npy     int32 [M]           class ids
  metadata.json  {"format_version", "num_examples", "num_views",
                  "token_shape": [h, w], "metadata": whatever the writer
                  passed (e.g. codebook size, dataset, split, crops)}

Format version 1 (tokens [M, h, w], no "num_views") is still read, as V = 1.

`TokenDatasetWriter` is opened with the final shape and filled batch by batch
through memory-mapped files in a temporary sibling directory (a cache of
ImageNet with 20 views is tens of GB, more than memory), then renamed into
place, so a directory with this name is always complete: a crash leaves only
the hidden temporary directory. It refuses to replace an existing dataset
unless asked to. `write_token_dataset` writes in-memory arrays through it.
`TokenSource` memory-maps the arrays (random access without loading them),
and `make_token_iterator` batches them through grain, drawing one view per
example anew each epoch, sharded per process and checkpointable like the
image pipeline (see `input_pipeline`).
"""

import json
import os
import shutil
import tempfile
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import grain
import numpy as np

from maskgit_jax.data import input_pipeline

TOKENS_FILE = "tokens.npy"
LABELS_FILE = "labels.npy"
METADATA_FILE = "metadata.json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def is_token_dataset(token_dir: str) -> bool:
  """Whether `token_dir` holds a complete token dataset."""
  return os.path.isfile(os.path.join(token_dir, METADATA_FILE))


def _fsync_file(path: str) -> None:
  with open(path, "rb+") as f:
    os.fsync(f.fileno())


def _save_npy(path: str, array: np.ndarray) -> None:
  with open(path, "wb") as f:
    np.save(f, array, allow_pickle=False)
    f.flush()
    os.fsync(f.fileno())


def _as_int32(name: str, array: Any, ndim: int) -> np.ndarray:
  array = np.asarray(array)
  if not np.issubdtype(array.dtype, np.integer) or array.ndim != ndim:
    raise ValueError(f"{name} must be an integer array with {ndim} dimensions, "
                     f"got {array.dtype} {array.shape}.")
  if array.size and (array.min() < 0 or array.max() > np.iinfo(np.int32).max):
    raise ValueError(f"{name} must lie in [0, 2**31), got "
                     f"[{array.min()}, {array.max()}].")
  return array.astype(np.int32, copy=False)


def _check_target(token_dir: str, overwrite: bool) -> None:
  if not os.path.exists(token_dir):
    return
  if not os.path.isdir(token_dir):
    raise FileExistsError(f"{token_dir!r} exists and is not a directory.")
  if is_token_dataset(token_dir):
    if not overwrite:
      raise FileExistsError(
          f"A token dataset already exists at {token_dir!r}; pass "
          "overwrite=True to replace it, or choose another directory.")
  elif os.listdir(token_dir):
    raise FileExistsError(
        f"{token_dir!r} exists, is not empty and holds no token dataset "
        f"(no {METADATA_FILE}); refusing to write over it.")


def _positive_shape(name: str, value: int) -> int:
  if isinstance(value, bool) or not isinstance(
      value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}={value!r} must be a positive integer.")
  return int(value)


class TokenDatasetWriter:
  """Streams a token dataset of known shape to disk, committed atomically.

  Use as a context manager: `append` batches of tokens int [n, V, h, w] and
  labels int [n] in order; leaving the block normally commits (every row
  must have been written), an exception discards everything. `metadata` must
  be JSON-serialisable. Raises FileExistsError if a dataset (or anything
  else) is already at `token_dir`, unless `overwrite`.
  """

  def __init__(self, token_dir: str, *, num_examples: int, num_views: int,
               token_shape: Sequence[int],
               metadata: Optional[Mapping[str, Any]] = None,
               overwrite: bool = False):
    self.num_examples = _positive_shape("num_examples", num_examples)
    self.num_views = _positive_shape("num_views", num_views)
    if len(token_shape) != 2:
      raise ValueError(f"token_shape={tuple(token_shape)} must be (h, w).")
    self.token_shape: Tuple[int, int] = tuple(
        _positive_shape("token_shape", s) for s in token_shape)
    self.path = os.path.abspath(os.path.expanduser(token_dir))
    self._overwrite = overwrite
    self._info_text = json.dumps(  # Fails early if not serialisable.
        {"format_version": FORMAT_VERSION, "num_examples": self.num_examples,
         "num_views": self.num_views, "token_shape": list(self.token_shape),
         "metadata": dict(metadata or {})}, indent=2, sort_keys=True)
    _check_target(self.path, overwrite)
    parent, self._name = os.path.split(self.path)
    os.makedirs(parent, exist_ok=True)
    self._tmp = tempfile.mkdtemp(prefix=f".{self._name}.tmp-", dir=parent)
    try:
      self._tokens = np.lib.format.open_memmap(
          os.path.join(self._tmp, TOKENS_FILE), mode="w+", dtype=np.int32,
          shape=(self.num_examples, self.num_views, *self.token_shape))
    except BaseException:
      shutil.rmtree(self._tmp, ignore_errors=True)
      raise
    self._labels = np.zeros(self.num_examples, np.int32)
    self.count = 0  # Rows written so far.

  def append(self, tokens: Any, labels: Any) -> None:
    """Writes the next len(labels) examples."""
    if self._tokens is None:
      raise ValueError(f"The writer of {self.path!r} is already closed.")
    tokens = _as_int32("tokens", tokens, 4)
    labels = _as_int32("labels", labels, 1)
    want = (self.num_views, *self.token_shape)
    if tokens.shape[1:] != want or len(tokens) != len(labels):
      raise ValueError(f"Expected tokens [n, {', '.join(map(str, want))}] and "
                       f"labels [n], got {tokens.shape} and {labels.shape}.")
    end = self.count + len(labels)
    if end > self.num_examples:
      raise ValueError(f"{end} examples exceed the {self.num_examples} the "
                       f"writer of {self.path!r} was opened for.")
    self._tokens[self.count:end] = tokens
    self._labels[self.count:end] = labels
    self.count = end

  def commit(self) -> str:
    """Flushes, writes the metadata last and renames into place."""
    if self.count != self.num_examples:
      raise ValueError(f"Only {self.count} of {self.num_examples} examples "
                       f"were written to {self.path!r}; nothing committed.")
    self._tokens.flush()
    self._tokens = None  # Closes the memory map.
    _fsync_file(os.path.join(self._tmp, TOKENS_FILE))
    _save_npy(os.path.join(self._tmp, LABELS_FILE), self._labels)
    with open(os.path.join(self._tmp, METADATA_FILE), "w",
              encoding="utf-8") as f:
      f.write(self._info_text)
      f.flush()
      os.fsync(f.fileno())
    _check_target(self.path, self._overwrite)  # Someone may have written it.
    parent = os.path.dirname(self.path)
    old = None
    if self._overwrite and is_token_dataset(self.path):
      old = tempfile.mkdtemp(prefix=f".{self._name}.old-", dir=parent)
      os.rename(self.path, os.path.join(old, self._name))
    try:
      # Fails (ENOTEMPTY) rather than replace a directory that has files.
      os.rename(self._tmp, self.path)
    except BaseException:
      if old is not None and not os.path.exists(self.path):
        os.rename(os.path.join(old, self._name), self.path)
      raise
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
    return self.path

  def abort(self) -> None:
    """Discards what was written (the target is left untouched)."""
    self._tokens = None
    shutil.rmtree(self._tmp, ignore_errors=True)

  def __enter__(self) -> "TokenDatasetWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None:
      self.abort()
      return
    try:
      self.commit()
    except BaseException:
      self.abort()
      raise


def write_token_dataset(token_dir: str, tokens: np.ndarray, labels: np.ndarray,
                        metadata: Optional[Mapping[str, Any]] = None, *,
                        overwrite: bool = False) -> str:
  """Writes in-memory tokens and labels int [M] atomically; returns the dir.

  Tokens are int [M, V, h, w] (V views per example) or [M, h, w] (one view).
  `metadata` must be JSON-serialisable. Raises FileExistsError if a dataset
  (or anything else) is already at `token_dir`, unless `overwrite`.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim == 3:
    tokens = tokens[:, None]
  tokens = _as_int32("tokens", tokens, 4)
  labels = _as_int32("labels", labels, 1)
  if len(tokens) != len(labels) or not len(tokens):
    raise ValueError(f"Need as many labels as token grids, at least one: got "
                     f"tokens {tokens.shape}, labels {labels.shape}.")
  with TokenDatasetWriter(token_dir, num_examples=len(tokens),
                          num_views=tokens.shape[1],
                          token_shape=tokens.shape[2:], metadata=metadata,
                          overwrite=overwrite) as writer:
    writer.append(tokens, labels)
  return writer.path


def _read_info(token_dir: str, missing_hint: str = "") -> Dict[str, Any]:
  if not is_token_dataset(token_dir):
    message = (f"No token dataset at {token_dir!r} (expected {TOKENS_FILE}, "
               f"{LABELS_FILE} and {METADATA_FILE}).")
    raise FileNotFoundError(f"{message} {missing_hint}".strip())
  with open(os.path.join(token_dir, METADATA_FILE), encoding="utf-8") as f:
    info = json.load(f)
  if info.get("format_version") not in READABLE_VERSIONS:
    raise ValueError(f"Token dataset {token_dir!r} has format version "
                     f"{info.get('format_version')}; this code reads "
                     f"{list(READABLE_VERSIONS)}.")
  return info


def read_metadata(token_dir: str, missing_hint: str = "") -> Dict[str, Any]:
  """The metadata the writer passed, without opening the arrays."""
  token_dir = os.path.abspath(os.path.expanduser(token_dir))
  return _read_info(token_dir, missing_hint)["metadata"]


class TokenSource:
  """Random access to a token dataset: item i is {"tokens" [V, h, w], "label"}.

  `tokens` is the memory-mapped int32 [M, V, h, w] array (a version-1
  dataset gets V = 1); pickling (for grain worker processes) sends only the
  path.
  """

  def __init__(self, token_dir: str, missing_hint: str = ""):
    self.path = os.path.abspath(os.path.expanduser(token_dir))
    self._missing_hint = missing_hint
    info = _read_info(self.path, missing_hint)
    self.metadata: Dict[str, Any] = info["metadata"]
    self.token_shape = tuple(info["token_shape"])
    self.num_views = int(info.get("num_views", 1))
    self.tokens = np.load(os.path.join(self.path, TOKENS_FILE), mmap_mode="r",
                          allow_pickle=False)
    self.labels = np.load(os.path.join(self.path, LABELS_FILE), mmap_mode="r",
                          allow_pickle=False)
    if info["format_version"] == 1 and self.tokens.ndim == 3:
      self.tokens = self.tokens[:, None]  # Still a memory map.
    expected = (info["num_examples"], self.num_views, *self.token_shape)
    if self.tokens.shape != expected or self.labels.shape != expected[:1]:
      raise ValueError(f"Token dataset {self.path!r} is inconsistent: tokens "
                       f"{self.tokens.shape}, labels {self.labels.shape}, "
                       f"metadata says {expected}.")

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
    return {"tokens": np.array(self.tokens[index], dtype=np.int32),
            "label": np.int32(self.labels[index])}

  def __repr__(self) -> str:
    # grain compares reprs when restoring an iterator state.
    return f"TokenSource({self.path!r})"

  def __getstate__(self):
    return {"token_dir": self.path, "missing_hint": self._missing_hint}

  def __setstate__(self, state):
    self.__init__(**state)


class PickView(grain.transforms.RandomMap):
  """[V, h, w] views -> one [h, w] grid, drawn uniformly.

  grain seeds the generator from the loader seed and the record's position
  in the stream, so each epoch draws anew, reproducibly, and resuming from an
  iterator state draws what the saved iterator would have.
  """

  def random_map(self, element: Dict[str, np.ndarray],
                 rng: np.random.Generator) -> Dict[str, np.ndarray]:
    tokens = element["tokens"]
    return {**element, "tokens": tokens[rng.integers(len(tokens))]}


class FlattenTokens(grain.transforms.Map):
  """[h, w] token grid -> [h * w] in raster order."""

  def map(self, element: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    return {**element, "tokens": element["tokens"].reshape(-1)}


def make_token_iterator(token_dir: str, *, global_batch_size: int, seed: int,
                        shuffle: bool = True, num_epochs: Optional[int] = None,
                        drop_remainder: bool = True, flatten: bool = True,
                        process_index: Optional[int] = None,
                        process_count: Optional[int] = None,
                        worker_count: int = 0, worker_buffer_size: int = 2,
                        read_threads: int = 4, prefetch_buffer_size: int = 64,
                        missing_hint: str = "") -> grain.DataLoaderIterator:
  """Checkpointable iterator of host-local token batches, one view each.

  Yields {"tokens": int32 [b, h * w] ([b, h, w] if not `flatten`),
  "label": int32 [b]} with b = global_batch_size / process_count; repeats
  forever unless `num_epochs`. Each example's view is drawn per epoch (see
  `PickView`), so the same seed gives the same batches. `missing_hint` is
  appended to the FileNotFoundError raised when `token_dir` holds no token
  dataset (e.g. the command that writes it). The other arguments are those
  of `input_pipeline.make_loader`.
  """
  source = TokenSource(token_dir, missing_hint)
  transforms = [PickView()]
  if flatten:
    transforms.append(FlattenTokens())
  loader = input_pipeline.make_loader(
      source, transforms,
      global_batch_size=global_batch_size, seed=seed, shuffle=shuffle,
      num_epochs=num_epochs, drop_remainder=drop_remainder,
      process_index=process_index, process_count=process_count,
      worker_count=worker_count, worker_buffer_size=worker_buffer_size,
      read_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size)
  return iter(loader)
