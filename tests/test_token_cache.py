"""--mode=tokenize's cache writer, with a fake encoder on tiny idx files.

The encoder mean-pools 8x8 images to a 2x2 grid of ints in [0, 16), so the
tokens of every view can be recomputed from the view iterator.
"""

import gzip
import os

import numpy as np
import pytest

from maskgit_jax import config_base
from maskgit_jax.data import input_pipeline
from maskgit_jax.data import sources
from maskgit_jax.data import tokens as tokens_lib
from maskgit_jax.train import token_cache

NUM_TRAIN = 5
CODEBOOK = 16


def write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


@pytest.fixture(scope="module")
def data_config(tmp_path_factory):
  """Gradients (so crops and mirrors differ), one per record."""
  root = str(tmp_path_factory.mktemp("idx"))
  ramp = np.arange(28)[None, None, :] * 8 + np.arange(28)[None, :, None]
  for prefix, n in (("train", NUM_TRAIN), ("t10k", 2)):
    images = (ramp + 11 * np.arange(n)[:, None, None]) % 256
    write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), images)
    write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"),
              np.arange(n) % 10)
  config = input_pipeline.default_data_config()
  config.source_dir = root
  config.data_dir = str(tmp_path_factory.mktemp("tfds"))
  config.image_size = 8
  sources.prepare(config)
  return config


def tokenizer_config(data_config, num_crops=2, flip=True, batch_size=8):
  config = config_base.tokenizer_config()
  config.data = data_config
  config.tokenize.update(num_crops=num_crops, flip=flip, batch_size=batch_size)
  return config


def fake_encode(images):
  n = len(images)
  pooled = images.reshape(n, 2, 4, 2, 4, 3).mean(axis=(2, 4, 5))
  return np.round(pooled * (CODEBOOK - 1)).astype(np.int64)


class Recorder:
  def __init__(self, fail_on_call=None):
    self.shapes, self.fail_on_call = [], fail_on_call

  def __call__(self, images):
    self.shapes.append(images.shape)
    if len(self.shapes) == self.fail_on_call:
      raise RuntimeError("encoder crashed")
    return fake_encode(images)


def test_cache_holds_every_view_of_every_image(data_config, tmp_path):
  config = tokenizer_config(data_config)  # 2 crops + mirrors: V = 4.
  encode = Recorder()
  out = str(tmp_path / "tokens" / "train")
  assert token_cache.write_token_cache(config, encode, out, CODEBOOK) == out
  # 8 images per call = 2 examples x 4 views; the last (1 example) padded.
  assert encode.shapes == [(8, 8, 8, 3)] * 3
  source = tokens_lib.TokenSource(out)
  assert len(source) == NUM_TRAIN and source.num_views == 4
  assert source.token_shape == (2, 2)
  assert source.metadata == {
      "codebook_size": CODEBOOK, "image_size": 8, "dataset": "fashion_mnist",
      "split": "train", "num_classes": 10, "num_views": 4, "num_crops": 2,
      "flip": True}
  views = np.concatenate([b["views"] for b in input_pipeline.make_view_iterator(
      data_config, split="train", global_batch_size=4, num_crops=2, flip=True,
      seed=config.seed, process_index=0, process_count=1)])
  want = fake_encode(views.reshape(-1, 8, 8, 3)).reshape(NUM_TRAIN, 4, 2, 2)
  np.testing.assert_array_equal(source.tokens, want)
  labels = [int(s["label"]) for s in sources.build_source(data_config, "train")]
  np.testing.assert_array_equal(source.labels, labels)
  assert not np.array_equal(want[:, 0], want[:, 1])  # The mirror differs.
  assert not np.array_equal(want[:, 0], want[:, 2])  # So do the crops.
  # Stage 2 reads one view per example.
  batch = next(tokens_lib.make_token_iterator(
      out, global_batch_size=5, seed=0, process_index=0, process_count=1))
  assert batch["tokens"].shape == (5, 4) and batch["label"].shape == (5,)

  # A second run finds the cache and does no work.
  never = Recorder(fail_on_call=1)
  assert token_cache.write_token_cache(config, never, out, CODEBOOK) == out
  assert never.shapes == []


def test_centre_crop_without_flip_is_one_view(data_config, tmp_path):
  config = tokenizer_config(data_config, num_crops=0, flip=False,
                            batch_size=3)
  encode = Recorder()
  out = token_cache.write_token_cache(config, encode, str(tmp_path / "t"),
                                      CODEBOOK)
  assert encode.shapes == [(3, 8, 8, 3)] * 2
  source = tokens_lib.TokenSource(out)
  assert source.num_views == 1 and len(source) == NUM_TRAIN
  assert source.metadata["num_crops"] == 0 and not source.metadata["flip"]


def test_a_crash_mid_cache_leaves_no_cache(data_config, tmp_path):
  config = tokenizer_config(data_config)
  out = str(tmp_path / "tokens" / "train")
  with pytest.raises(RuntimeError, match="encoder crashed"):
    token_cache.write_token_cache(config, Recorder(fail_on_call=2), out,
                                  CODEBOOK)
  assert not tokens_lib.is_token_dataset(out)
  assert os.listdir(tmp_path / "tokens") == []  # Temporary files removed.


def test_bad_settings_and_encoders_are_errors(data_config, tmp_path):
  out = str(tmp_path / "t")
  with pytest.raises(ValueError, match="num_crops=-1"):
    token_cache.write_token_cache(tokenizer_config(data_config, num_crops=-1),
                                  fake_encode, out, CODEBOOK)
  with pytest.raises(ValueError, match="tokenize.batch_size=0"):
    token_cache.write_token_cache(tokenizer_config(data_config, batch_size=0),
                                  fake_encode, out, CODEBOOK)
  with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
    token_cache.write_token_cache(tokenizer_config(data_config), fake_encode,
                                  out, 4)
  assert not os.path.exists(out)
