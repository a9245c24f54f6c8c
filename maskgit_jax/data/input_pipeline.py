"""Grain pipelines: sources -> host-local numpy image batches.

Each process reads its own shard of the data and yields

  {"image": float32 [b, S, S, 3] in [0, 1], "label": int32 [b]}

with b = global_batch_size / process_count and S = data.image_size, ready for
`jax.make_array_from_process_local_data`.

Training: seeded global shuffle (a new order each epoch), random resized crop,
optional horizontal flip, batches of exactly b (drop_remainder), repeated
forever unless `num_epochs` is set. Evaluation: the records in order, the
largest central square resized to S, one epoch, a smaller last batch.
Grayscale images become 3 equal channels. Token caches (`make_view_iterator`,
for --mode=tokenize): the records in order, one epoch, each as V views
(centre crop, or several random resized crops drawn like training's, each
optionally with its mirror image), seeded per record.

Augmentation draws from grain's per-record generator, seeded by `seed` and
the record's position in the stream, so the batches depend only on the seed,
the worker count (each worker makes whole batches) and the number of batches
already taken, not on threads or timing. The
returned iterator has `get_state()` (bytes) and `set_state(bytes)`: a new
iterator with the same arguments, given a saved state, yields exactly the
batches the saved one would have yielded next. It also implements orbax's
save/load for checkpointing next to the train state. A state only restores
into an iterator with the same dataset, split, seed, sharding, batch and
worker count.

The data config's keys are described in `data_config`.
"""

import json
import math
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import grain
import jax
import numpy as np
import PIL.Image
import tqdm
from ml_collections import config_dict

from maskgit_jax.data import in_memory
from maskgit_jax.data import sources
from maskgit_jax.data.data_config import default_data_config  # noqa: F401

Example = Dict[str, np.ndarray]




def random_crop_box(height: int, width: int, rng: np.random.Generator,
                    scale: Tuple[float, float],
                    ratio: Tuple[float, float]) -> Tuple[float, ...]:
  """(left, top, right, bottom) of a random crop, in pixels (fractional).

  Draws the aspect ratio first, then the area as a fraction of the largest
  crop with that ratio, so no draw is ever rejected.
  """
  aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
  if width / height >= aspect:
    crop_h, crop_w = float(height), height * aspect
  else:
    crop_h, crop_w = width / aspect, float(width)
  side = math.sqrt(rng.uniform(scale[0], scale[1]))
  crop_h, crop_w = crop_h * side, crop_w * side
  left = rng.uniform(0.0, width - crop_w)
  top = rng.uniform(0.0, height - crop_h)
  return (left, top, left + crop_w, top + crop_h)


def center_square_box(height: int, width: int) -> Tuple[float, ...]:
  """(left, top, right, bottom) of the largest central square."""
  side = min(height, width)
  left, top = (width - side) / 2, (height - side) / 2
  return (left, top, left + side, top + side)


def crop_resize_uint8(image: np.ndarray, box: Sequence[float], size: int,
                      flip: bool = False) -> np.ndarray:
  """Crops `box` of a uint8 image and resizes it to uint8 [size, size, 3].

  One antialiased bicubic resample (PIL) does both; `flip` mirrors the result
  left-right. Grayscale becomes three equal channels; alpha is dropped.
  """
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  pil = PIL.Image.fromarray(image)
  if pil.mode not in ("L", "RGB"):
    pil = pil.convert("RGB")
  pil = pil.resize((size, size), PIL.Image.Resampling.BICUBIC, box=tuple(box))
  if flip:
    pil = pil.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
  out = np.asarray(pil)
  if out.ndim == 2:
    out = np.repeat(out[..., None], 3, axis=-1)
  return out


def unit_float(images: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [0, 1], the pipelines' output."""
  return images.astype(np.float32) * np.float32(1 / 255)


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Float images in [0, 1] (the pipelines' output) -> uint8; the inverse of
  `unit_float` on its outputs. uint8 input is returned as it is."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  return np.round(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)


def crop_resize(image: np.ndarray, box: Sequence[float], size: int,
                flip: bool = False) -> np.ndarray:
  """`crop_resize_uint8` as float32 [size, size, 3] in [0, 1]."""
  return unit_float(crop_resize_uint8(image, box, size, flip))


class TrainAugment(grain.transforms.RandomMap):
  """Random resized crop + optional flip, from the record's own generator."""

  def __init__(self, image_size: int, scale: Tuple[float, float],
               ratio: Tuple[float, float], flip: bool):
    self.image_size, self.scale, self.ratio, self.flip = (
        image_size, tuple(scale), tuple(ratio), flip)

  def random_map(self, element: Dict[str, Any],
                 rng: np.random.Generator) -> Example:
    image = np.asarray(element["image"])
    box = random_crop_box(image.shape[0], image.shape[1], rng, self.scale,
                          self.ratio)
    flip = self.flip and rng.random() < 0.5
    return {"image": crop_resize(image, box, self.image_size, flip),
            "label": np.int32(element["label"])}


class EvalPreprocess(grain.transforms.Map):
  """Largest central square resized to image_size."""

  def __init__(self, image_size: int):
    self.image_size = image_size

  def map(self, element: Dict[str, Any]) -> Example:
    image = np.asarray(element["image"])
    box = center_square_box(image.shape[0], image.shape[1])
    return {"image": crop_resize(image, box, self.image_size),
            "label": np.int32(element["label"])}


def _check_range(name: str, value: Sequence[float], low: float,
                 high: float) -> Tuple[float, float]:
  lo, hi = (float(v) for v in value)
  if not low < lo <= hi <= high:
    raise ValueError(f"data.{name}={tuple(value)} must satisfy "
                     f"{low} < lo <= hi <= {high}.")
  return lo, hi


def _image_size(data_config: config_dict.ConfigDict) -> int:
  size = int(data_config.image_size)
  if size <= 0:
    raise ValueError(f"data.image_size={size} must be positive.")
  return size


def _crop_ranges(data_config: config_dict.ConfigDict
                 ) -> Tuple[Tuple[float, float], Tuple[float, float]]:
  """The checked (scale, ratio) of random resized crops."""
  scale = _check_range("random_resized_crop_scale",
                       data_config.random_resized_crop_scale, 0.0, 1.0)
  ratio = _check_range("random_resized_crop_ratio",
                       data_config.random_resized_crop_ratio, 0.0, math.inf)
  return scale, ratio


def image_transforms(data_config: config_dict.ConfigDict,
                     train: bool) -> List[grain.transforms.Transformation]:
  """Per-record transforms (before batching) for training or evaluation."""
  size = _image_size(data_config)
  if not train:
    return [EvalPreprocess(size)]
  scale, ratio = _crop_ranges(data_config)
  return [TrainAugment(size, scale, ratio, bool(data_config.random_flip))]


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """The per-process batch; the global batch must split evenly."""
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} must be a positive multiple of "
        f"the number of processes ({process_count}).")
  return global_batch_size // process_count


class GlobalBatchSampler:
  """A grain sampler whose global batches do not depend on the process
  count: the records of global batch j are the same whether one process
  reads all of them or P processes read b = B / P rows each.

  Global position g (row g % B of global batch g // B) holds record
  perm_e[g % N] of epoch e = g // N (a seeded permutation per epoch), with
  grain's per-record generator seeded by g. Process p reads rows
  [p * b, (p + 1) * b) of every global batch. Grain asks a process for the
  indices p, p + P, p + 2P, ..., shared round robin by its W workers, each
  worker making whole batches of its own records; `__getitem__` maps such
  an index back to its global position, so a 1-process and a P-process run
  train on the same batches (same worker count per process).
  """

  def __init__(self, num_records: int, *, global_batch_size: int,
               process_count: int, worker_count: int, seed: int):
    self._num_records = num_records
    self._process_count = process_count
    self._local_batch = global_batch_size // process_count
    self._global_batch = global_batch_size
    self._workers = max(1, worker_count)
    self._seed = seed
    self._order = grain.MapDataset.range(num_records).shuffle(seed=seed)

  def __len__(self) -> int:
    return sys.maxsize

  def __repr__(self) -> str:
    return (f"GlobalBatchSampler(num_records={self._num_records}, "
            f"global_batch_size={self._global_batch}, "
            f"process_count={self._process_count}, "
            f"workers={self._workers}, seed={self._seed})")

  def global_position(self, index: int) -> int:
    process, local = index % self._process_count, index // self._process_count
    worker, taken = local % self._workers, local // self._workers
    batch_of_worker, row = divmod(taken, self._local_batch)
    local_batch = batch_of_worker * self._workers + worker
    return (local_batch * self._global_batch + process * self._local_batch
            + row)

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    if index < 0:
      raise IndexError(f"index {index} < 0")
    position = self.global_position(index)
    rng = np.random.Generator(np.random.Philox(key=self._seed + position))
    return grain.RecordMetadata(index=index,
                                record_key=int(self._order[position]),
                                rng=rng)


class GlobalBatchIterator:
  """The iterator of a `GlobalBatchSampler` stream: grain's, plus `seek`.

  Its position is a number of global batches, which means the same for
  any process count, so a checkpoint's data position can be carried over
  to a job with another number of processes (the checkpoint itself keeps
  one grain state per process).
  """

  def __init__(self, loader: grain.DataLoader, *, process_index: int,
               process_count: int, worker_count: int, local_batch: int):
    self._iterator = iter(loader)
    self._process_index, self._process_count = process_index, process_count
    self._worker_count, self._local_batch = worker_count, local_batch

  def __iter__(self) -> "GlobalBatchIterator":
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> bytes:
    return self._iterator.get_state()

  def set_state(self, state: bytes) -> None:
    self._iterator.set_state(state)

  def __getattr__(self, name: str) -> Any:
    return getattr(self._iterator, name)  # e.g. grain's start_prefetch

  def seek(self, num_batches: int) -> None:
    """Positions the stream after its first `num_batches` batches (grain's
    own state layout: the last index each worker read)."""
    p, n, b = self._process_index, self._process_count, self._local_batch
    workers = max(1, self._worker_count)
    state = json.loads(self._iterator.get_state())
    seen = {}
    for w in range(workers):  # Batches j < num_batches with j % W == w.
      records = (num_batches - w + workers - 1) // workers * b
      seen[str(w)] = p - workers * n + w * n + records * workers * n
    state["last_seen_indices"] = seen
    state["last_worker_index"] = ((num_batches - 1) % workers
                                  if self._worker_count else -1)
    self._iterator.set_state(json.dumps(state, indent=4).encode())


class _GlobalBatchLoader:
  """A grain DataLoader whose iterators are `GlobalBatchIterator`s."""

  def __init__(self, loader: grain.DataLoader, **layout):
    self._loader, self._layout = loader, layout

  def __iter__(self) -> GlobalBatchIterator:
    return GlobalBatchIterator(self._loader, **self._layout)


def make_loader(source, transforms: Sequence[Any], *, global_batch_size: int,
                seed: int, shuffle: bool, num_epochs: Optional[int],
                drop_remainder: bool, process_index: Optional[int] = None,
                process_count: Optional[int] = None, worker_count: int = 0,
                worker_buffer_size: int = 2, read_threads: int = 4,
                prefetch_buffer_size: int = 64) -> grain.DataLoader:
  """A grain DataLoader over this process's share of `source`, batched.

  Processes default to jax's. Shuffled endless training streams
  (`shuffle`, `drop_remainder`, no `num_epochs`) use `GlobalBatchSampler`:
  the global batches are the same for any number of processes, and its
  iterators can `seek` to a global batch. One-pass
  streams give each process a disjoint, contiguous part of the records
  (equal parts when `drop_remainder`), shuffled within it when `shuffle`.
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in "
                     f"[0, process_count={process_count}).")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed={seed} must be in [0, 2**32) (grain's range).")
  batch_size = local_batch_size(global_batch_size, process_count)
  shard = grain.sharding.ShardOptions(process_index, process_count,
                                      drop_remainder=drop_remainder)
  if len(source) < process_count:
    raise ValueError(f"{len(source)} records cannot be shared by "
                     f"{process_count} processes.")
  if shuffle and drop_remainder and num_epochs is None:
    sampler = GlobalBatchSampler(
        len(source), global_batch_size=global_batch_size,
        process_count=process_count, worker_count=worker_count, seed=seed)
  else:
    sampler = grain.samplers.IndexSampler(
        num_records=len(source), shard_options=shard, shuffle=shuffle,
        num_epochs=num_epochs, seed=seed)
  loader = grain.DataLoader(
      data_source=source, sampler=sampler,
      operations=[*transforms, grain.transforms.Batch(batch_size,
                                                      drop_remainder)],
      worker_count=worker_count, worker_buffer_size=worker_buffer_size,
      shard_options=shard,
      read_options=grain.ReadOptions(num_threads=read_threads,
                                     prefetch_buffer_size=prefetch_buffer_size))
  if isinstance(sampler, GlobalBatchSampler):
    return _GlobalBatchLoader(loader, process_index=process_index,
                              process_count=process_count,
                              worker_count=worker_count,
                              local_batch=batch_size)
  return loader


def loader_options(data_config: config_dict.ConfigDict) -> Dict[str, int]:
  """The worker and prefetch settings of `make_loader`, from a data config."""
  return {key: int(data_config[key]) for key in
          ("worker_count", "worker_buffer_size", "read_threads",
           "prefetch_buffer_size")}


def make_image_iterator(data_config: config_dict.ConfigDict, *, split: str,
                        global_batch_size: int, seed: int, train: bool,
                        num_epochs: Optional[int] = None,
                        drop_remainder: Optional[bool] = None,
                        shuffle: Optional[bool] = None,
                        process_index: Optional[int] = None,
                        process_count: Optional[int] = None
                        ) -> grain.DataLoaderIterator:
  """Checkpointable iterator of host-local image batches.

  Args:
    data_config: see the module docstring.
    split: e.g. data_config.train_split, or a TFDS slice like "train[:10%]".
    global_batch_size: the batch summed over all processes.
    seed: shuffle and augmentation seed, in [0, 2**32).
    train: augment (random resized crop, flip); otherwise centre crop.
    num_epochs: passes over the data; default forever when training, once
      otherwise.
    drop_remainder: only full batches (and equal shards); default `train`.
      Multi-host evaluation needs equal batches on every host: set it, or pad.
    shuffle: default `train`.
    process_index, process_count: this process's shard; default jax's.
  """
  if num_epochs is None and not train:
    num_epochs = 1
  source = sources.build_source(data_config, split)
  loader = make_loader(
      source, image_transforms(data_config, train),
      global_batch_size=global_batch_size, seed=seed,
      shuffle=train if shuffle is None else shuffle, num_epochs=num_epochs,
      drop_remainder=train if drop_remainder is None else drop_remainder,
      process_index=process_index, process_count=process_count,
      **loader_options(data_config))
  return iter(loader)


# Evaluation passes over splits held in memory.


def centre_views(source: in_memory.InMemorySource, image_size: int
                 ) -> Tuple[np.ndarray, np.ndarray]:
  """uint8 [N, S, S, 3] centre views (`EvalPreprocess`) and int32 [N] labels
  of every record of an in-memory split, computed once per process."""
  def compute():
    images = np.empty((len(source), image_size, image_size, 3), np.uint8)
    labels = np.empty((len(source),), np.int32)
    for index in tqdm.trange(len(source), unit="image", leave=False,
                             desc=f"evaluation views of {source.name}"):
      record = source[index]
      image = np.asarray(record["image"])
      images[index] = crop_resize_uint8(
          image, center_square_box(image.shape[0], image.shape[1]),
          image_size)
      labels[index] = record["label"]
    return images, labels
  return source.derived(("centre_views", int(image_size)), compute)


def eval_batches(data_config: config_dict.ConfigDict, *, split: str,
                 batch_size: int, uint8: bool = False) -> Iterator[Example]:
  """One pass over `split` in record order with the evaluation crop, the
  last batch smaller, for one process: the batches of `make_image_iterator(
  train=False, process_index=0, process_count=1)`. A split held in memory
  (`data.in_memory`) is preprocessed once per process and then sliced,
  without grain's per-record work (about 0.2 ms a record on one core).
  With `uint8`, the images come as uint8 pixels (`to_uint8` of the floats),
  which an in-memory split hands out without converting at all."""
  source = sources.build_source(data_config, split)
  if not isinstance(source, in_memory.InMemorySource):
    for batch in make_image_iterator(
        data_config, split=split, global_batch_size=batch_size, seed=0,
        train=False, process_index=0, process_count=1):
      yield ({**batch, "image": to_uint8(batch["image"])} if uint8
             else batch)
    return
  images, labels = centre_views(source, _image_size(data_config))
  as_pixels = (lambda x: x) if uint8 else unit_float
  for start in range(0, len(images), batch_size):
    yield {"image": as_pixels(images[start:start + batch_size]),
           "label": labels[start:start + batch_size]}


def centre_view_batches(source: in_memory.InMemorySource, records: range, *,
                        image_size: int, flip: bool, batch_size: int
                        ) -> Iterator[Example]:
  """`make_view_iterator`'s batches for `records` of an in-memory split with
  num_crops=0: {"views": float32 [b, V, S, S, 3], "label": int32 [b]}, the
  centre view then (with `flip`) its mirror image, sliced from
  `centre_views`."""
  images, labels = centre_views(source, image_size)
  records = np.asarray(records, np.int64)
  for start in range(0, len(records), batch_size):
    chosen = records[start:start + batch_size]
    views = unit_float(images[chosen])
    views = (np.stack([views, views[:, :, ::-1]], axis=1) if flip
             else views[:, None])
    yield {"views": views, "label": labels[chosen]}


# Views for the token cache (--mode=tokenize).


def num_views(num_crops: int, flip: bool) -> int:
  """Views per image: (num_crops, or 1 centre crop) x (2 with the mirror)."""
  if isinstance(num_crops, bool) or not isinstance(
      num_crops, (int, np.integer)) or num_crops < 0:
    raise ValueError(f"num_crops={num_crops!r} must be an integer >= 0 (0: "
                     "the centre crop; n: n random resized crops).")
  if not isinstance(flip, (bool, np.bool_)):
    raise ValueError(f"flip={flip!r} must be True or False.")
  return max(int(num_crops), 1) * (2 if flip else 1)


class IndexedSource:
  """A source whose records also carry their index, so that per-record
  randomness follows the record, not its position in a (sharded) stream."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    return {**self.source[index], "index": np.int64(index)}

  def __repr__(self) -> str:
    return f"IndexedSource({self.source!r})"


class MakeViews(grain.transforms.Map):
  """One record -> {"views": float32 [V, S, S, 3], "label"}.

  num_crops = 0: the evaluation centre crop; n > 0: n random resized crops
  (the training augmentation's boxes) from a generator seeded by (seed,
  record index), so re-running gives the same views. With `flip` each crop
  is followed by its mirror image.
  """

  def __init__(self, image_size: int, num_crops: int, flip: bool, seed: int,
               scale: Tuple[float, float], ratio: Tuple[float, float]):
    num_views(num_crops, flip)  # Checks them.
    self.image_size, self.num_crops, self.flip, self.seed = (
        image_size, int(num_crops), bool(flip), int(seed))
    self.scale, self.ratio = tuple(scale), tuple(ratio)

  def boxes(self, height: int, width: int,
            index: int) -> List[Tuple[float, ...]]:
    if not self.num_crops:
      return [center_square_box(height, width)]
    rng = np.random.default_rng([self.seed, int(index)])
    return [random_crop_box(height, width, rng, self.scale, self.ratio)
            for _ in range(self.num_crops)]

  def map(self, element: Dict[str, Any]) -> Example:
    image = np.asarray(element["image"])
    views = []
    for box in self.boxes(image.shape[0], image.shape[1], element["index"]):
      views.append(crop_resize(image, box, self.image_size))
      if self.flip:  # The mirror of the resized crop: one resample, not two.
        views.append(views[-1][:, ::-1])
    return {"views": np.stack(views), "label": np.int32(element["label"])}


def make_view_iterator(data_config: config_dict.ConfigDict, *, split: str,
                       global_batch_size: int, num_crops: int, flip: bool,
                       seed: int, process_index: Optional[int] = None,
                       process_count: Optional[int] = None
                       ) -> grain.DataLoaderIterator:
  """Batches of every record's views, in record order, for the token cache.

  Yields {"views": float32 [b, V, S, S, 3] in [0, 1], "label": int32 [b]}
  over one pass, the last batch smaller, with V = `num_views(num_crops,
  flip)` in the order crop 0, crop 0 mirrored, crop 1, ... (see
  `MakeViews`). The crops depend only on `seed` and the record, not on the
  batch size, sharding or worker count.
  """
  scale, ratio = _crop_ranges(data_config)
  views = MakeViews(_image_size(data_config), num_crops, flip, seed, scale,
                    ratio)
  source = IndexedSource(sources.build_source(data_config, split))
  loader = make_loader(
      source, [views], global_batch_size=global_batch_size, seed=seed,
      shuffle=False, num_epochs=1, drop_remainder=False,
      process_index=process_index, process_count=process_count,
      **loader_options(data_config))
  return iter(loader)
