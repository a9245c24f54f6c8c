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
through memory-mapped files in a temporary directory (a cache of ImageNet
with 20 views is tens of GB, more than memory), and the metadata file is
written last. It refuses to replace an existing dataset unless asked to.
`write_token_dataset` writes in-memory arrays through it and
`concatenate_token_datasets` joins datasets (e.g. the parts several
processes wrote) into one. `TokenSource` memory-maps the arrays (random
access without loading them), and `make_token_iterator` batches them
through grain, drawing one view per example anew each epoch, sharded per
process and checkpointable like the image pipeline (see `input_pipeline`).

A dataset may live on a local disk or an object store (a URL such as
gs://bucket/dir, through `etils.epath`):

- Local: the temporary directory is a hidden sibling, renamed into place,
  so a directory with the dataset's name is always complete and a crash
  leaves only the temporary directory.
- Object store: there is no atomic rename of a directory, so the files are
  built on local disk (`tempfile`, which honours $TMPDIR) and copied into
  place with metadata.json last. metadata.json is the commit marker:
  readers (`is_token_dataset`) take a directory without it as unfinished,
  and a writer may replace such leftovers of an interrupted copy. Memory
  maps need local files, so `TokenSource` reads from a local copy
  (`local_copy`, under $XDG_CACHE_HOME or ~/.cache), made once and reused
  while the original's metadata file is unchanged.
"""

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import grain
import numpy as np
from etils import epath

from maskgit_jax import files
from maskgit_jax.data import input_pipeline

PathLike = files.PathLike
TOKENS_FILE = "tokens.npy"
LABELS_FILE = "labels.npy"
METADATA_FILE = "metadata.json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_COPY_CHUNK_BYTES = 64 * 2**20  # per read when copying a file
_MERGE_CHUNK_BYTES = 256 * 2**20  # of tokens per append when concatenating


# ---------------------------------------------------------------- paths


def _normalize(path: PathLike) -> str:
  """An absolute local path, or the URL as given (never a local folder
  named `gs:`, which os.path.abspath would make of gs://...)."""
  path = os.fspath(path)
  if not files.is_local(path):
    return path.rstrip("/")
  if path.startswith("file://"):
    path = path[len("file://"):]
  return os.path.abspath(os.path.expanduser(path))


def _join(token_dir: str, name: str) -> str:
  if files.is_local(token_dir):
    return os.path.join(token_dir, name)
  return os.fspath(epath.Path(token_dir) / name)


def _read_text(path: str) -> Optional[str]:
  """The text of a local or remote file; None if there is none."""
  try:
    if files.is_local(path):
      with open(path, encoding="utf-8") as f:
        return f.read()
    return epath.Path(path).read_text()
  except (FileNotFoundError, NotADirectoryError):
    return None


def _copy_file(src: str, dst: str) -> None:
  """Streams one file from or to an object store, in chunks (a local
  path's own `copy` would make a folder `gs:` of a gs:// destination)."""
  with epath.Path(src).open("rb") as fin, epath.Path(dst).open("wb") as fout:
    shutil.copyfileobj(fin, fout, _COPY_CHUNK_BYTES)


def cache_root() -> str:
  """Where `local_copy` keeps copies of non-local token datasets:
  $XDG_CACHE_HOME/maskgit_jax/tokens (default ~/.cache/...)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
  return os.path.join(os.path.abspath(os.path.expanduser(base)),
                      "maskgit_jax", "tokens")


def _origin(url: str) -> Dict[str, Any]:
  """What identifies one commit of a remote dataset: the URL and the time
  its metadata file was written (a dataset written again, even with the
  same metadata, is another commit)."""
  return {"url": url,
          "mtime": int(epath.Path(_join(url, METADATA_FILE)).stat().mtime)}


def local_copy(token_dir: PathLike, root: Optional[str] = None) -> str:
  """A local directory holding the token dataset at `token_dir`.

  A local dataset is its own directory. A remote one is copied into
  `root` (default `cache_root()`) under a hash of its URL, once: the copy is
  reused while the original's metadata file (its commit marker) is the one
  it was copied from. Processes on one machine may call this together.
  """
  url = _normalize(token_dir)
  if files.is_local(url):
    return url
  info_text = _read_text(_join(url, METADATA_FILE))
  if info_text is None:
    raise FileNotFoundError(f"No token dataset at {url!r} (no "
                            f"{METADATA_FILE}).")
  origin = json.dumps(_origin(url), sort_keys=True)
  root = root or cache_root()
  dest = os.path.join(root, hashlib.sha256(url.encode()).hexdigest()[:24])
  if (_read_text(os.path.join(dest, METADATA_FILE)) == info_text and
      _read_text(os.path.join(dest, "origin.json")) == origin):
    return dest
  os.makedirs(root, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".copy-", dir=root)
  try:
    for name in (TOKENS_FILE, LABELS_FILE):
      _copy_file(_join(url, name), os.path.join(tmp, name))
    for name, text in (("origin.json", origin), (METADATA_FILE, info_text)):
      with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
        f.write(text)
    _replace_dir(tmp, dest)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return dest


def _replace_dir(new: str, dest: str) -> None:
  """Renames the complete local directory `new` to `dest`, setting aside a
  previous `dest` (open memory maps of it stay valid)."""
  if os.path.exists(dest):
    old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(dest))
    try:
      os.rename(dest, os.path.join(old, "dataset"))
    except FileNotFoundError:  # Another process set it aside first.
      pass
    shutil.rmtree(old, ignore_errors=True)
  try:
    os.rename(new, dest)
  except OSError:
    # Another process on this machine put its copy there first: the same
    # one, unless the original changed meanwhile.
    if _read_text(os.path.join(dest, METADATA_FILE)) != _read_text(
        os.path.join(new, METADATA_FILE)):
      raise


def _remove_tree(path: str) -> None:
  """Removes a local or remote directory, if it exists."""
  if files.is_local(path):
    shutil.rmtree(path, ignore_errors=True)
    return
  epath.Path(path).rmtree(missing_ok=True)


def is_token_dataset(token_dir: PathLike) -> bool:
  """Whether `token_dir` holds a complete token dataset, i.e. its metadata
  file, which every writer writes last (the commit marker)."""
  path = _join(_normalize(token_dir), METADATA_FILE)
  if files.is_local(path):
    return os.path.isfile(path)
  return epath.Path(path).is_file()


# ---------------------------------------------------------------- writing


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
  path = epath.Path(token_dir)
  if not path.exists():
    return
  if not path.is_dir():
    raise FileExistsError(f"{token_dir!r} exists and is not a directory.")
  if is_token_dataset(token_dir):
    if not overwrite:
      raise FileExistsError(
          f"A token dataset already exists at {token_dir!r}; pass "
          "overwrite=True to replace it, or choose another directory.")
    return
  names = {child.name for child in path.iterdir()}
  # On an object store, arrays without a metadata file are what an
  # interrupted commit left: the next writer replaces them.
  unfinished = (not files.is_local(token_dir) and
                names <= {TOKENS_FILE, LABELS_FILE})
  if names and not unfinished:
    raise FileExistsError(
        f"{token_dir!r} exists, is not empty and holds no token dataset "
        f"(no {METADATA_FILE}); refusing to write over it.")


def _positive_shape(name: str, value: int) -> int:
  if isinstance(value, bool) or not isinstance(
      value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}={value!r} must be a positive integer.")
  return int(value)


class TokenDatasetWriter:
  """Streams a token dataset of known shape to disk, committed atomically
  (local) or by its metadata file, copied last (object store).

  Use as a context manager: `append` batches of tokens int [n, V, h, w] and
  labels int [n] in order; leaving the block normally commits (every row
  must have been written), an exception discards everything. `metadata` must
  be JSON-serialisable. Raises FileExistsError if a dataset (or anything
  else) is already at `token_dir`, unless `overwrite`. `token_dir` may be
  a URL (see the module docstring).
  """

  def __init__(self, token_dir: PathLike, *, num_examples: int,
               num_views: int, token_shape: Sequence[int],
               metadata: Optional[Mapping[str, Any]] = None,
               overwrite: bool = False):
    self.num_examples = _positive_shape("num_examples", num_examples)
    self.num_views = _positive_shape("num_views", num_views)
    if len(token_shape) != 2:
      raise ValueError(f"token_shape={tuple(token_shape)} must be (h, w).")
    self.token_shape: Tuple[int, int] = tuple(
        _positive_shape("token_shape", s) for s in token_shape)
    self.path = _normalize(token_dir)
    self._overwrite = overwrite
    self._info_text = json.dumps(  # Fails early if not serialisable.
        {"format_version": FORMAT_VERSION, "num_examples": self.num_examples,
         "num_views": self.num_views, "token_shape": list(self.token_shape),
         "metadata": dict(metadata or {})}, indent=2, sort_keys=True)
    _check_target(self.path, overwrite)
    if files.is_local(self.path):
      parent, self._name = os.path.split(self.path)
      os.makedirs(parent, exist_ok=True)
      self._tmp = tempfile.mkdtemp(prefix=f".{self._name}.tmp-", dir=parent)
    else:  # Built on local disk, copied to the object store by `commit`.
      self._tmp = tempfile.mkdtemp(prefix="maskgit_jax-tokens-")
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
    """Flushes, writes the metadata last and renames (or copies) into
    place."""
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
    if not files.is_local(self.path):
      self._upload()
      shutil.rmtree(self._tmp, ignore_errors=True)
      return self.path
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

  def _upload(self) -> None:
    """Copies the finished files to the object store, the metadata file (the
    commit marker) last; an old dataset there is uncommitted first."""
    target = epath.Path(self.path)
    (target / METADATA_FILE).unlink(missing_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    for name in (TOKENS_FILE, LABELS_FILE, METADATA_FILE):
      _copy_file(os.path.join(self._tmp, name), _join(self.path, name))

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


def write_token_dataset(token_dir: PathLike, tokens: np.ndarray,
                        labels: np.ndarray,
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


def concatenate_token_datasets(token_dir: PathLike, parts: Sequence[PathLike],
                               metadata: Optional[Mapping[str, Any]] = None,
                               *, overwrite: bool = False) -> str:
  """Writes the examples of the token datasets `parts`, in order, as one
  dataset at `token_dir` (the very files one writer given them all in turn
  would write); returns its path.

  The parts must agree on views and grid. `metadata` defaults to the first
  part's. Copies in chunks, so memory stays flat; a non-local part is copied
  to a temporary local directory first, one part at a time.
  """
  paths = [_normalize(part) for part in parts]
  if not paths:
    raise ValueError("concatenate_token_datasets needs at least one part.")
  infos = [_read_info(path) for path in paths]
  layouts = {(int(info.get("num_views", 1)), tuple(info["token_shape"]))
             for info in infos}
  if len(layouts) != 1:
    raise ValueError(f"The parts {paths} differ in (num_views, token_shape): "
                     f"{sorted(layouts)}.")
  (num_views, token_shape), = layouts
  chunk = max(1, _MERGE_CHUNK_BYTES // (4 * num_views * int(np.prod(
      token_shape))))
  with TokenDatasetWriter(
      token_dir, num_examples=sum(int(i["num_examples"]) for i in infos),
      num_views=num_views, token_shape=token_shape,
      metadata=infos[0]["metadata"] if metadata is None else metadata,
      overwrite=overwrite) as writer:
    for path, info in zip(paths, infos):
      with tempfile.TemporaryDirectory(prefix="maskgit_jax-part-") as scratch:
        tokens, labels = _open_arrays(local_copy(path, root=scratch), info,
                                      path)
        for start in range(0, len(labels), chunk):
          writer.append(tokens[start:start + chunk],
                        labels[start:start + chunk])
  return writer.path


# ---------------------------------------------------------------- reading


def _read_info(token_dir: str, missing_hint: str = "") -> Dict[str, Any]:
  text = _read_text(_join(token_dir, METADATA_FILE))
  if text is None:
    message = (f"No token dataset at {token_dir!r} (expected {TOKENS_FILE}, "
               f"{LABELS_FILE} and {METADATA_FILE}).")
    raise FileNotFoundError(f"{message} {missing_hint}".strip())
  info = json.loads(text)
  if info.get("format_version") not in READABLE_VERSIONS:
    raise ValueError(f"Token dataset {token_dir!r} has format version "
                     f"{info.get('format_version')}; this code reads "
                     f"{list(READABLE_VERSIONS)}.")
  return info


def read_metadata(token_dir: PathLike,
                  missing_hint: str = "") -> Dict[str, Any]:
  """The metadata the writer passed, without opening (or copying) the
  arrays."""
  return _read_info(_normalize(token_dir), missing_hint)["metadata"]


def _open_arrays(local_dir: str, info: Mapping[str, Any],
                 name: str) -> Tuple[np.ndarray, np.ndarray]:
  """Memory maps of tokens [M, V, h, w] and labels [M] (a version-1 dataset
  gets V = 1), checked against the metadata `info` of dataset `name`."""
  tokens = np.load(os.path.join(local_dir, TOKENS_FILE), mmap_mode="r",
                   allow_pickle=False)
  labels = np.load(os.path.join(local_dir, LABELS_FILE), mmap_mode="r",
                   allow_pickle=False)
  if info["format_version"] == 1 and tokens.ndim == 3:
    tokens = tokens[:, None]  # Still a memory map.
  expected = (info["num_examples"], int(info.get("num_views", 1)),
              *info["token_shape"])
  if tokens.shape != expected or labels.shape != expected[:1]:
    raise ValueError(f"Token dataset {name!r} is inconsistent: tokens "
                     f"{tokens.shape}, labels {labels.shape}, metadata says "
                     f"{expected}.")
  return tokens, labels


class TokenSource:
  """Random access to a token dataset: item i is {"tokens" [V, h, w], "label"}.

  `tokens` is the memory-mapped int32 [M, V, h, w] array (a version-1
  dataset gets V = 1), of `local_path`: the dataset's directory, or for one
  on an object store its `local_copy`. `path` (and the repr grain compares
  when restoring an iterator state) stays the name it was opened with.
  Pickling (for grain worker processes) sends only that name.
  """

  def __init__(self, token_dir: PathLike, missing_hint: str = ""):
    self.path = _normalize(token_dir)
    self._missing_hint = missing_hint
    info = _read_info(self.path, missing_hint)
    self.local_path = local_copy(self.path)
    if self.local_path != self.path:
      info = _read_info(self.local_path)  # The version that was copied.
    self.metadata: Dict[str, Any] = info["metadata"]
    self.token_shape = tuple(info["token_shape"])
    self.num_views = int(info.get("num_views", 1))
    self.tokens, self.labels = _open_arrays(self.local_path, info, self.path)

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


def make_token_iterator(token_dir: PathLike, *, global_batch_size: int,
                        seed: int, shuffle: bool = True,
                        num_epochs: Optional[int] = None,
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
