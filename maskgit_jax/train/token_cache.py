"""--mode=tokenize: encodes the training split into the token cache once.

Stage 2 reads the cache instead of running the VQGAN encoder in every step.
Each image is stored as V views (`config.tokenize`): the centre crop
(num_crops=0) or num_crops random resized crops drawn like the training
augmentation, each with its mirror image when `flip`; the transformer's input
pipeline draws one view per example per epoch (see `data.tokens`). The
writer streams to disk, so the cache may exceed memory.

Several processes (a pod) share the work. Process p encodes a contiguous
range of the records (`record_range`) on its own devices into a token
dataset of its own, a part (`part_dirs`: `.train.parts/` next to the cache).
When every process has finished, process 0 alone concatenates the parts in
record order into the cache (the very files one process would write, byte
for byte: the crops are seeded by each record's index in the split, never
by the sharding), commits it and removes the parts; the others return once
it exists. Process 0 must read every part, so the workdir must be one file
system for all of them: an object store (gs://...) or a shared disk.
A crash leaves no cache (at most parts, which a re-run replaces).

Config keys (the tokenizer stage's ConfigDict): data (the images), seed (the
crops), tokenize.batch_size (images, views included, per encoder call),
tokenize.num_crops, tokenize.flip.
"""

import os
from typing import Any, Callable, Dict, Iterator, List

import jax
import numpy as np
import tqdm
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import config_dict

from maskgit_jax.data import in_memory
from maskgit_jax.data import input_pipeline
from maskgit_jax.data import sources
from maskgit_jax.data import tokens as tokens_lib
from maskgit_jax.train import loop

Encode = Callable[[np.ndarray], Any]


def examples_per_batch(batch_size: int, num_views: int) -> int:
  """Images per batch so that an encoder call sees about `batch_size` views
  (memory stays flat however many views are stored)."""
  if isinstance(batch_size, bool) or not isinstance(
      batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"tokenize.batch_size={batch_size!r} must be a positive "
                     "integer (images per encoder call).")
  return max(1, int(batch_size) // num_views)


def encoder_batch_size(config: config_dict.ConfigDict) -> int:
  """Images (views included) in every encoder call: the last, smaller batch
  is padded to it, so the encoder compiles once. Checks config.tokenize."""
  tok = config.tokenize
  views = input_pipeline.num_views(tok.num_crops, tok.flip)
  return examples_per_batch(tok.batch_size, views) * views


def record_range(num_records: int, process_index: int,
                 process_count: int) -> range:
  """The records process `process_index` encodes.

  Contiguous ranges in process order whose sizes differ by at most one, so
  the parts concatenate into record order and every record is encoded once.
  (grain's own sharding is not used for this: its DataLoader gives every
  shard num_records // process_count records and skips the rest.)
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in "
                     f"[0, process_count={process_count}).")
  if num_records < process_count:
    raise ValueError(f"{num_records} records cannot be shared by "
                     f"{process_count} processes.")
  base, extra = divmod(num_records, process_count)
  start = process_index * base + min(process_index, extra)
  return range(start, start + base + (process_index < extra))


class RecordRange:
  """The records `records` (a range) of a source, each with "index", its
  index in the whole source, which seeds its crops (`MakeViews`)."""

  def __init__(self, source, records: range):
    self.source, self.records = source, records

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    record = self.records[index]
    return {**self.source[record], "index": np.int64(record)}

  def __repr__(self) -> str:
    return f"RecordRange({self.source!r}, {self.records!r})"


def view_batches(config: config_dict.ConfigDict, records: range,
                 batch_size: int) -> Iterator[Dict[str, np.ndarray]]:
  """{"views": float32 [b, V, S, S, 3], "label": int32 [b]} of `records` of
  the training split, in order, the last batch smaller: for any range, the
  rows `input_pipeline.make_view_iterator` yields for those records."""
  data, tok = config.data, config.tokenize
  # pylint: disable=protected-access  # The view iterator's own checks.
  scale, ratio = input_pipeline._crop_ranges(data)
  views = input_pipeline.MakeViews(input_pipeline._image_size(data),
                                   tok.num_crops, tok.flip, config.seed,
                                   scale, ratio)
  # pylint: enable=protected-access
  split = sources.build_source(data, data.train_split)
  if isinstance(split, in_memory.InMemorySource) and not views.num_crops:
    return input_pipeline.centre_view_batches(
        split, records, image_size=views.image_size, flip=views.flip,
        batch_size=batch_size)
  source = RecordRange(split, records)
  return iter(input_pipeline.make_loader(
      source, [views], global_batch_size=batch_size, seed=config.seed,
      shuffle=False, num_epochs=1, drop_remainder=False, process_index=0,
      process_count=1, **input_pipeline.loader_options(data)))


def _encode_batch(encode: Encode, views: np.ndarray, rows: int,
                  codebook_size: int) -> np.ndarray:
  """Encodes [b, V, S, S, 3] views as [b, V, h, w], padding b to `rows` so
  the jitted encoder compiles once (the last batch is smaller)."""
  b, v = views.shape[:2]
  images = views.reshape(b * v, *views.shape[2:])
  if b < rows:
    pad = np.zeros(((rows - b) * v, *images.shape[1:]), images.dtype)
    images = np.concatenate([images, pad])
  indices = np.asarray(encode(images))[:b * v]
  if indices.ndim != 3 or not np.issubdtype(indices.dtype, np.integer):
    raise ValueError(f"encode must return int indices [n, h, w], got "
                     f"{indices.dtype} {indices.shape}.")
  if indices.min() < 0 or indices.max() >= codebook_size:
    raise ValueError(f"encode returned indices in [{indices.min()}, "
                     f"{indices.max()}], outside [0, {codebook_size}).")
  return indices.reshape(b, v, *indices.shape[1:])


def cache_metadata(config: config_dict.ConfigDict,
                   codebook_size: int) -> Dict[str, Any]:
  """What the cache records about how it was made (stage 2 checks some)."""
  data, tok = config.data, config.tokenize
  return {"codebook_size": int(codebook_size),
          "image_size": int(data.image_size), "dataset": data.name,
          "split": data.train_split,
          "num_classes": int(sources.num_classes(data)),
          "num_views": input_pipeline.num_views(tok.num_crops, tok.flip),
          "num_crops": int(tok.num_crops), "flip": bool(tok.flip)}


def encode_records(config: config_dict.ConfigDict, encode: Encode,
                   out_dir: str, records: range, codebook_size: int) -> str:
  """Encodes every view of `records` of data.train_split into a token
  dataset at `out_dir` (nothing is left there if it fails); returns it."""
  tok = config.tokenize
  views = input_pipeline.num_views(tok.num_crops, tok.flip)
  rows = examples_per_batch(tok.batch_size, views)
  meta = cache_metadata(config, codebook_size)
  writer = None
  try:
    with tqdm.tqdm(total=len(records), desc="tokenize", unit="image",
                   disable=jax.process_index() != 0) as bar:
      for batch in view_batches(config, records, rows):
        indices = _encode_batch(encode, batch["views"], rows, codebook_size)
        if writer is None:  # The grid's shape is known from the first batch.
          writer = tokens_lib.TokenDatasetWriter(
              out_dir, num_examples=len(records), num_views=views,
              token_shape=indices.shape[2:], metadata=meta)
        writer.append(indices, batch["label"])
        bar.update(len(indices))
    if writer is None:
      raise ValueError(f"Records {records} of {config.data.name!r} gave no "
                       "batch; nothing to tokenize.")
    return writer.commit()
  except BaseException:
    if writer is not None:
      writer.abort()
    raise


def parts_dir(out_dir: str) -> str:
  """Where the processes of a multi-process job write their parts."""
  path = epath.Path(out_dir)
  return os.fspath(path.parent / f".{path.name}.parts")


def part_dirs(out_dir: str, process_count: int) -> List[str]:
  """Each process's part, in process (and so record) order."""
  parts = epath.Path(parts_dir(out_dir))
  return [os.fspath(parts / f"{p:05d}-of-{process_count:05d}")
          for p in range(process_count)]


def _remove(path: str) -> None:
  epath.Path(path).rmtree(missing_ok=True)


def _report_existing(out_dir: str, config: config_dict.ConfigDict) -> None:
  meta = tokens_lib.read_metadata(out_dir)
  message = f"Token cache {out_dir} exists; nothing to do."
  want = {"num_crops": int(config.tokenize.num_crops),
          "flip": bool(config.tokenize.flip)}
  have = {key: meta.get(key) for key in want}
  if have != want:
    message += (f" It was written with {have}, not {want}; delete it to "
                "re-tokenize.")
  loop.announce(message)


def _everywhere(step: Callable[[], Any], what: str) -> None:
  """Runs `step` on this process, then waits for every process to finish
  its own (a barrier). A failure anywhere is raised on every process, so
  none waits forever for one that crashed."""
  error = None
  try:
    step()
  except Exception as e:  # pylint: disable=broad-except  # Re-raised below.
    error = e
  ok = np.asarray(multihost_utils.process_allgather(np.int32(error is None)))
  if error is not None:
    raise error
  if not ok.all():
    raise RuntimeError(
        f"Process(es) {np.flatnonzero(ok == 0).tolist()} failed while "
        f"{what} (see their logs); no token cache was written. Re-run the "
        "command to redo it.")


def _assemble(out_dir: str, parts: List[str], meta: Dict[str, Any]) -> None:
  """Process 0: the parts, in order, into the committed cache."""
  for path in parts:
    if not tokens_lib.is_token_dataset(path):
      raise FileNotFoundError(
          f"The part {path!r} another process wrote is not visible here: "
          "with several processes the workdir must be one file system for "
          "all of them (an object store such as gs://..., or a shared "
          "disk).")
  tokens_lib.concatenate_token_datasets(out_dir, parts, meta)
  _remove(parts_dir(out_dir))


def _write_in_parts(config: config_dict.ConfigDict, encode: Encode,
                    out_dir: str, total: int, codebook_size: int) -> None:
  index, count = jax.process_index(), jax.process_count()
  records = record_range(total, index, count)
  parts = part_dirs(out_dir, count)

  def encode_mine():
    encode_records(config, encode, parts[index], records, codebook_size)

  def assemble_on_0():
    if index == 0:
      _assemble(out_dir, parts, cache_metadata(config, codebook_size))

  _everywhere(encode_mine, "encoding their records")
  _everywhere(assemble_on_0, "assembling the cache")


def _cache_exists(out_dir: str) -> bool:
  """Whether the cache is complete, as process 0 sees it, on every process
  (so all of them skip the work, or none). Process 0 first removes the parts
  an interrupted run may have left, before any process writes its own."""
  if jax.process_count() == 1:
    return tokens_lib.is_token_dataset(out_dir)
  exists = False
  if jax.process_index() == 0:
    exists = tokens_lib.is_token_dataset(out_dir)
    if not exists:
      _remove(parts_dir(out_dir))
  return bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))


def write_token_cache(config: config_dict.ConfigDict, encode: Encode,
                      out_dir: str, codebook_size: int) -> str:
  """Encodes every view of data.train_split into `out_dir`; returns it.

  `encode` maps float32 images [n, S, S, 3] in [0, 1] to int indices
  [n, h, w] (e.g. a jitted tokenizer encoder), on this process's devices.
  Every process of a job calls this; each encodes its share of the records
  (see the module docstring). An existing complete cache is kept as it is.
  `out_dir` may be local or on an object store (see `data.tokens`).
  """
  out_dir = os.fspath(out_dir)
  encoder_batch_size(config)  # Bad settings fail before any work.
  if _cache_exists(out_dir):
    _report_existing(out_dir, config)
    return out_dir
  data = config.data
  total = len(sources.build_source(data, data.train_split))
  if not total:
    raise ValueError(f"Split {data.train_split!r} of {data.name!r} is "
                     "empty; nothing to tokenize.")
  if jax.process_count() == 1:
    encode_records(config, encode, out_dir, range(total), codebook_size)
  else:
    _write_in_parts(config, encode, out_dir, total, codebook_size)
  views = input_pipeline.num_views(config.tokenize.num_crops,
                                   config.tokenize.flip)
  loop.announce(f"Wrote {total} x {views} token grids to {out_dir}.")
  return out_dir
