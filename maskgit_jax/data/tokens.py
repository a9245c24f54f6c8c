"""Token cache: a dataset's tokenizer codes, written once, read by stage 2.

A token dataset is a directory of plain files (never pickle):

  tokens.npy     int32 [M, h, w]  codebook indices, one grid per image
  labels.npy     int32 [M]        class ids
  metadata.json  {"format_version", "num_examples", "token_shape",
                  "metadata": whatever the writer passed (e.g. tokenizer
                  checkpoint, codebook size, dataset, split)}

`write_token_dataset` writes it into a temporary sibling directory and renames
that into place, so a directory with this name is always complete; it refuses
to replace an existing dataset unless asked to. `TokenSource` memory-maps the
arrays (random access without loading them), and `make_token_iterator` batches
them through grain, sharded per process and checkpointable like the image
pipeline (see `input_pipeline`).
"""

import json
import os
import shutil
import tempfile
from typing import Any, Dict, Mapping, Optional

import grain
import numpy as np

from maskgit_jax.data import input_pipeline

TOKENS_FILE = "tokens.npy"
LABELS_FILE = "labels.npy"
METADATA_FILE = "metadata.json"
FORMAT_VERSION = 1


def is_token_dataset(token_dir: str) -> bool:
  """Whether `token_dir` holds a complete token dataset."""
  return os.path.isfile(os.path.join(token_dir, METADATA_FILE))


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


def write_token_dataset(token_dir: str, tokens: np.ndarray, labels: np.ndarray,
                        metadata: Optional[Mapping[str, Any]] = None, *,
                        overwrite: bool = False) -> str:
  """Writes tokens int [M, h, w] and labels int [M] atomically; returns the dir.

  `metadata` must be JSON-serialisable. Raises FileExistsError if a dataset
  (or anything else) is already at `token_dir`, unless `overwrite`.
  """
  tokens = _as_int32("tokens", tokens, 3)
  labels = _as_int32("labels", labels, 1)
  if len(tokens) != len(labels) or not len(tokens):
    raise ValueError(f"Need as many labels as token grids, at least one: got "
                     f"tokens {tokens.shape}, labels {labels.shape}.")
  info = {"format_version": FORMAT_VERSION, "num_examples": len(tokens),
          "token_shape": list(tokens.shape[1:]),
          "metadata": dict(metadata or {})}
  info_text = json.dumps(info, indent=2, sort_keys=True)  # Fails early.
  token_dir = os.path.abspath(os.path.expanduser(token_dir))
  _check_target(token_dir, overwrite)
  parent, name = os.path.split(token_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  old = None
  try:
    _save_npy(os.path.join(tmp, TOKENS_FILE), tokens)
    _save_npy(os.path.join(tmp, LABELS_FILE), labels)
    with open(os.path.join(tmp, METADATA_FILE), "w", encoding="utf-8") as f:
      f.write(info_text)
      f.flush()
      os.fsync(f.fileno())
    _check_target(token_dir, overwrite)  # Again: someone may have written it.
    if overwrite and is_token_dataset(token_dir):
      old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
      os.rename(token_dir, os.path.join(old, name))
    # Fails (ENOTEMPTY) rather than replace a directory that has files.
    os.rename(tmp, token_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None and not os.path.exists(token_dir):
      os.rename(os.path.join(old, name), token_dir)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
  return token_dir


def _read_info(token_dir: str, missing_hint: str = "") -> Dict[str, Any]:
  if not is_token_dataset(token_dir):
    message = (f"No token dataset at {token_dir!r} (expected {TOKENS_FILE}, "
               f"{LABELS_FILE} and {METADATA_FILE}).")
    raise FileNotFoundError(f"{message} {missing_hint}".strip())
  with open(os.path.join(token_dir, METADATA_FILE), encoding="utf-8") as f:
    info = json.load(f)
  if info.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"Token dataset {token_dir!r} has format version "
                     f"{info.get('format_version')}; this code reads "
                     f"{FORMAT_VERSION}.")
  return info


def read_metadata(token_dir: str, missing_hint: str = "") -> Dict[str, Any]:
  """The metadata the writer passed, without opening the arrays."""
  token_dir = os.path.abspath(os.path.expanduser(token_dir))
  return _read_info(token_dir, missing_hint)["metadata"]


class TokenSource:
  """Random access to a token dataset: item i is {"tokens" [h, w], "label"}.

  The arrays are memory-mapped; pickling (for grain worker processes) sends
  only the path.
  """

  def __init__(self, token_dir: str, missing_hint: str = ""):
    self.path = os.path.abspath(os.path.expanduser(token_dir))
    self._missing_hint = missing_hint
    info = _read_info(self.path, missing_hint)
    self.metadata: Dict[str, Any] = info["metadata"]
    self.token_shape = tuple(info["token_shape"])
    self.tokens = np.load(os.path.join(self.path, TOKENS_FILE), mmap_mode="r",
                          allow_pickle=False)
    self.labels = np.load(os.path.join(self.path, LABELS_FILE), mmap_mode="r",
                          allow_pickle=False)
    expected = (info["num_examples"], *self.token_shape)
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
  """Checkpointable iterator of host-local token batches.

  Yields {"tokens": int32 [b, h * w] ([b, h, w] if not `flatten`),
  "label": int32 [b]} with b = global_batch_size / process_count; repeats
  forever unless `num_epochs`. `missing_hint` is appended to the
  FileNotFoundError raised when `token_dir` holds no token dataset (e.g. the
  command that writes it). The other arguments are those of
  `input_pipeline.make_loader`.
  """
  source = TokenSource(token_dir, missing_hint)
  loader = input_pipeline.make_loader(
      source, [FlattenTokens()] if flatten else [],
      global_batch_size=global_batch_size, seed=seed, shuffle=shuffle,
      num_epochs=num_epochs, drop_remainder=drop_remainder,
      process_index=process_index, process_count=process_count,
      worker_count=worker_count, worker_buffer_size=worker_buffer_size,
      read_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size)
  return iter(loader)
