"""--mode=tokenize: encodes the training split into the token cache once.

Stage 2 reads the cache instead of running the VQGAN encoder in every step.
Each image is stored as V views (`config.tokenize`): the centre crop
(num_crops=0) or num_crops random resized crops drawn like the training
augmentation, each with its mirror image when `flip`; the transformer's input
pipeline draws one view per example per epoch (see `data.tokens`). The
writer streams to disk, so the cache may exceed memory.

Config keys (the tokenizer stage's ConfigDict): data (the images), seed (the
crops), tokenize.batch_size (images, views included, per encoder call),
tokenize.num_crops, tokenize.flip.
"""

from typing import Any, Callable, Dict

import numpy as np
import tqdm
from ml_collections import config_dict

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


def write_token_cache(config: config_dict.ConfigDict, encode: Encode,
                      out_dir: str, codebook_size: int) -> str:
  """Encodes every view of data.train_split into `out_dir`; returns it.

  `encode` maps float32 images [n, S, S, 3] in [0, 1] to int indices
  [n, h, w] (e.g. a jitted tokenizer encoder). Single process for now. An
  existing complete cache is kept as it is.
  """
  if tokens_lib.is_token_dataset(out_dir):
    _report_existing(out_dir, config)
    return out_dir
  data, tok = config.data, config.tokenize
  views = input_pipeline.num_views(tok.num_crops, tok.flip)
  rows = examples_per_batch(tok.batch_size, views)
  meta = cache_metadata(config, codebook_size)
  total = len(sources.build_source(data, data.train_split))
  iterator = input_pipeline.make_view_iterator(
      data, split=data.train_split, global_batch_size=rows,
      num_crops=tok.num_crops, flip=tok.flip, seed=config.seed,
      process_index=0, process_count=1)
  writer = None
  try:
    with tqdm.tqdm(total=total, desc="tokenize", unit="image") as bar:
      for batch in iterator:
        indices = _encode_batch(encode, batch["views"], rows, codebook_size)
        if writer is None:  # The grid's shape is known from the first batch.
          writer = tokens_lib.TokenDatasetWriter(
              out_dir, num_examples=total, num_views=views,
              token_shape=indices.shape[2:], metadata=meta)
        writer.append(indices, batch["label"])
        bar.update(len(indices))
    if writer is None:
      raise ValueError(f"Split {data.train_split!r} of {data.name!r} is "
                       "empty; nothing to tokenize.")
    writer.commit()
  except BaseException:
    if writer is not None:
      writer.abort()
    raise
  loop.announce(f"Wrote {total} x {views} token grids to {out_dir}.")
  return out_dir
