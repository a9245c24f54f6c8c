"""Reference statistics: computed once per dataset and split, kept as npz.

Our cache file holds `mu` [D] and `sigma` [D, D] (float64) and, for
precision/recall, `features` [N, D] (float32, a uniform subset of the
reference features). Files are written with np.savez and read with
allow_pickle=False: nothing a user loads can run code.

The ADM evaluator's reference batches (guided-diffusion; e.g.
`VIRTUAL_imagenet256_labeled.npz`) are read as well, so FID is measured
against the statistics other papers use. Such a file holds `mu` and
`sigma` (2048-d pool features of the whole dataset), `mu_s` and `sigma_s`
(spatial features, for sFID) and `arr_0`: the reference images, uint8
[N, H, W, 3] (10,000 of them, used for precision/recall after running the
feature network on them). `arr_0` may also hold precomputed features
[N, D], and `arr_1`, when present with one entry per row, is read as
labels. The images take about 2 GB at 256x256, so `arr_0` is streamed in
batches rather than loaded.
"""

import contextlib
import dataclasses
import hashlib
import os
import re
import zipfile
from typing import Iterator, Optional, Tuple, Union

from etils import epath
import numpy as np

PathLike = Union[str, os.PathLike]
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.+=-]")


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
  """mu [D], sigma [D, D] and optionally a feature subset [N, D]."""
  mu: np.ndarray
  sigma: np.ndarray
  features: Optional[np.ndarray] = None

  def __post_init__(self):
    mu = np.asarray(self.mu, np.float64)
    sigma = np.asarray(self.sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
      raise ValueError(f"Reference statistics need mu [D] and sigma [D, D], "
                       f"got shapes {mu.shape} and {sigma.shape}.")
    object.__setattr__(self, "mu", mu)
    object.__setattr__(self, "sigma", sigma)
    if self.features is not None:
      features = np.asarray(self.features, np.float32)
      if features.ndim != 2 or features.shape[1] != mu.shape[0]:
        raise ValueError(f"Reference features must have shape [N, "
                         f"{mu.shape[0]}] to match mu, got "
                         f"{features.shape}.")
      object.__setattr__(self, "features", features)

  @classmethod
  def from_feature_stats(cls, stats) -> "ReferenceStats":
    """From a `FeatureStats` (its kept features, if it keeps any)."""
    features = stats.features if stats.reservoir is not None else None
    return cls(stats.mu, stats.sigma, features)


def _name_part(label: str, value: str) -> str:
  if not isinstance(value, str) or not value:
    raise ValueError(f"{label} must be a non-empty string, got {value!r}.")
  safe = _NAME_CHARS.sub("_", value)
  if safe != value:  # keep distinct names distinct, e.g. train[:10%]
    safe += "_" + hashlib.sha1(value.encode()).hexdigest()[:8]
  return safe


def reference_cache_path(cache_dir: PathLike, dataset: str, split: str,
                         variant: Optional[str] = None) -> epath.Path:
  """Where the reference statistics of (dataset, split) are cached:
  `<cache_dir>/<dataset>-<split>[-<variant>].npz`.

  `variant` names whatever else the statistics depend on (feature network,
  image size), so that different ones never share a file. Characters
  outside [A-Za-z0-9_.+=-] (e.g. `/`, `[`, `%` in TFDS names and splits)
  become `_`, plus a short hash of the original.
  """
  parts = [_name_part("dataset", dataset), _name_part("split", split)]
  if variant is not None:
    parts.append(_name_part("variant", variant))
  return epath.Path(cache_dir) / ("-".join(parts) + ".npz")


def save_reference(path: PathLike, reference: ReferenceStats) -> epath.Path:
  """Writes `reference` to `path` (npz) via a temporary file and a rename,
  so a reader never sees half a file."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = {"mu": reference.mu, "sigma": reference.sigma}
  if reference.features is not None:
    arrays["features"] = reference.features
  temporary = path.parent / f".{path.name}.tmp-{os.getpid()}"
  with temporary.open("wb") as f:
    np.savez(f, **arrays)
  temporary.replace(path)
  return path


def load_reference(path: PathLike) -> ReferenceStats:
  """Reads statistics written by `save_reference` (no pickle)."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"No reference statistics at {path}.")
  with path.open("rb") as f, np.load(f, allow_pickle=False) as npz:
    keys = set(npz.files)
    if not {"mu", "sigma"} <= keys:
      raise ValueError(f"{path} holds {sorted(keys)}, not reference "
                       "statistics (keys mu, sigma, optionally features).")
    if "arr_0" in keys and "features" not in keys:
      raise ValueError(f"{path} looks like an ADM reference batch (arr_0); "
                       "read it with read_adm_reference().")
    return ReferenceStats(npz["mu"], npz["sigma"],
                          npz["features"] if "features" in keys else None)


# ---------------------------------------------------------------- ADM files


def _read_header(member) -> Optional[Tuple[tuple, bool, np.dtype]]:
  """(shape, fortran_order, dtype) of an .npy stream, None for versions
  this reader does not stream."""
  version = np.lib.format.read_magic(member)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(member)
  if version == (2, 0):
    return np.lib.format.read_array_header_2_0(member)
  return None


@contextlib.contextmanager
def _npz_member(path: epath.Path, key: str):
  with path.open("rb") as f, zipfile.ZipFile(f) as archive:
    name = f"{key}.npy"
    if name not in archive.namelist():
      raise ValueError(f"{path} has no array {key!r}; it holds "
                       f"{sorted(n[:-4] for n in archive.namelist())}.")
    with archive.open(name) as member:
      yield member


def npz_array_info(path: PathLike, key: str) -> Tuple[tuple, np.dtype]:
  """(shape, dtype) of array `key` in an npz file, without reading it."""
  path = epath.Path(path)
  with _npz_member(path, key) as member:
    header = _read_header(member)
  if header is None:
    with path.open("rb") as f, np.load(f, allow_pickle=False) as npz:
      array = npz[key]
      return array.shape, array.dtype
  shape, _, dtype = header
  if dtype.hasobject:
    raise ValueError(f"{path}:{key} holds Python objects (pickle), which "
                     "are never loaded.")
  return tuple(shape), dtype


def iter_npz_batches(path: PathLike, key: str,
                     batch_size: int) -> Iterator[np.ndarray]:
  """Yields array `key` of an npz file in batches of `batch_size` rows
  (the last may be shorter), reading only one batch at a time."""
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got "
                     f"{batch_size!r}.")
  path = epath.Path(path)
  with _npz_member(path, key) as member:
    header = _read_header(member)
    if header is not None and not header[1] and not header[2].hasobject:
      shape, _, dtype = header
      row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
      for start in range(0, shape[0], batch_size):
        rows = min(batch_size, shape[0] - start)
        data = member.read(rows * row_bytes)
        if len(data) != rows * row_bytes:
          raise ValueError(f"{path}:{key} is truncated at row {start}.")
        yield np.frombuffer(data, dtype).reshape(rows, *shape[1:])
      return
  if header is not None and header[2].hasobject:
    raise ValueError(f"{path}:{key} holds Python objects (pickle), which "
                     "are never loaded.")
  # Fortran order or an unusual format version: read it whole.
  with path.open("rb") as f, np.load(f, allow_pickle=False) as npz:
    array = npz[key]
  for start in range(0, array.shape[0], batch_size):
    yield array[start:start + batch_size]


@dataclasses.dataclass(frozen=True)
class AdmReferenceBatch:
  """An ADM evaluator reference batch. `arr_0` stays on disk: iterate it
  with `batches()` (images) or load it with `features()` (features)."""
  path: epath.Path
  mu: np.ndarray
  sigma: np.ndarray
  mu_spatial: Optional[np.ndarray]
  sigma_spatial: Optional[np.ndarray]
  labels: Optional[np.ndarray]
  arr_0_shape: tuple
  arr_0_dtype: np.dtype

  @property
  def holds_images(self) -> bool:
    """True for images [N, H, W, C] in arr_0, False for features [N, D]."""
    return len(self.arr_0_shape) == 4

  @property
  def num_examples(self) -> int:
    return self.arr_0_shape[0]

  def batches(self, batch_size: int) -> Iterator[np.ndarray]:
    """arr_0 in batches: uint8 NHWC images (or feature rows)."""
    return iter_npz_batches(self.path, "arr_0", batch_size)

  def features(self) -> np.ndarray:
    """arr_0 as features [N, D] float32; an error if it holds images."""
    if self.holds_images:
      raise ValueError(f"{self.path} holds images {self.arr_0_shape} in "
                       "arr_0, not features; run the feature network on "
                       "batches() instead.")
    return np.concatenate(list(self.batches(4096))).astype(np.float32)

  def to_reference(self, features=None) -> ReferenceStats:
    """The file's mu and sigma, with `features` (e.g. Inception features
    of its images) or, when arr_0 holds features, those."""
    if features is None and not self.holds_images:
      features = self.features()
    return ReferenceStats(self.mu, self.sigma, features)


def read_adm_reference(path: PathLike) -> AdmReferenceBatch:
  """Opens an ADM reference batch (mu, sigma, arr_0; optionally mu_s,
  sigma_s, arr_1), checking shapes; arr_0 itself is not read."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(
        f"No ADM reference batch at {path}; these files (e.g. "
        "VIRTUAL_imagenet256_labeled.npz) come with openai/guided-diffusion's"
        " evaluations and must be downloaded beforehand.")
  with path.open("rb") as f, np.load(f, allow_pickle=False) as npz:
    keys = set(npz.files)
    missing = {"mu", "sigma", "arr_0"} - keys
    if missing:
      raise ValueError(f"{path} is not an ADM reference batch: it lacks "
                       f"{sorted(missing)} (it holds {sorted(keys)}).")
    mu = np.asarray(npz["mu"], np.float64)
    sigma = np.asarray(npz["sigma"], np.float64)
    spatial = ((np.asarray(npz["mu_s"], np.float64),
                np.asarray(npz["sigma_s"], np.float64))
               if {"mu_s", "sigma_s"} <= keys else (None, None))
    labels = npz["arr_1"] if "arr_1" in keys else None
  shape, dtype = npz_array_info(path, "arr_0")
  if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
    raise ValueError(f"{path}: mu and sigma must have shapes [D] and "
                     f"[D, D], got {mu.shape} and {sigma.shape}.")
  if len(shape) == 4:
    if shape[-1] != 3 or dtype != np.uint8:
      raise ValueError(f"{path}: arr_0 images must be uint8 [N, H, W, 3], "
                       f"got {dtype} {shape}.")
  elif len(shape) != 2 or shape[1] != mu.shape[0]:
    raise ValueError(f"{path}: arr_0 must hold images [N, H, W, 3] or "
                     f"features [N, {mu.shape[0]}], got shape {shape}.")
  if labels is not None and labels.shape != (shape[0],):
    labels = None  # not one label per row: not labels
  return AdmReferenceBatch(path, mu, sigma, spatial[0], spatial[1], labels,
                           tuple(shape), dtype)
