"""--mode=tokenize's cache writer, with a fake encoder on tiny idx files.

The encoder mean-pools 8x8 images to a 2x2 grid of ints in [0, 16), so the
tokens of every view can be recomputed from the view iterator.
"""

import gzip
import importlib
import importlib.util
import os

import numpy as np
import pytest

import helpers
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


def test_views_of_a_record_range_are_those_of_the_whole_split(data_config):
  """A process's share of the records gets the crops one process would
  draw for them (they are seeded by the record's index in the split)."""
  config = tokenizer_config(data_config)
  whole = np.concatenate([b["views"] for b in input_pipeline.make_view_iterator(
      data_config, split="train", global_batch_size=4, num_crops=2, flip=True,
      seed=config.seed, process_index=0, process_count=1)])
  batches = list(token_cache.view_batches(config, range(2, 5), 2))
  assert [len(b["label"]) for b in batches] == [2, 1]
  np.testing.assert_array_equal(
      np.concatenate([b["views"] for b in batches]), whole[2:5])


@pytest.mark.parametrize("flip", [False, True])
def test_in_memory_centre_views_are_the_view_iterators(data_config, flip):
  """With the split in memory, the centre views of a record range are
  sliced from views computed once: the same batches as grain's."""
  config = tokenizer_config(data_config, num_crops=0, flip=flip)
  config.data = data_config.copy_and_resolve_references()
  config.data.in_memory = True
  batches = list(token_cache.view_batches(config, range(1, 5), 3))
  assert "views" in batches[0] and "image" not in batches[0]
  want = list(input_pipeline.make_view_iterator(
      data_config, split="train", global_batch_size=NUM_TRAIN, num_crops=0,
      flip=flip, seed=config.seed, process_index=0, process_count=1))[0]
  got = {key: np.concatenate([b[key] for b in batches])
         for key in ("views", "label")}
  assert [len(b["label"]) for b in batches] == [3, 1]
  for key in ("views", "label"):
    assert got[key].dtype == want[key].dtype
    np.testing.assert_array_equal(got[key], want[key][1:5])


def test_parts_concatenate_into_the_single_writer_files(data_config,
                                                        tmp_path):
  config = tokenizer_config(data_config)
  whole = token_cache.write_token_cache(config, fake_encode,
                                        str(tmp_path / "whole"), CODEBOOK)
  parts = [token_cache.encode_records(config, fake_encode,
                                      str(tmp_path / f"part{p}"), records,
                                      CODEBOOK)
           for p, records in enumerate([range(0, 3), range(3, 5)])]
  joined = tokens_lib.concatenate_token_datasets(str(tmp_path / "joined"),
                                                 parts)
  assert helpers.file_bytes(joined) == helpers.file_bytes(whole)
  other = tokens_lib.write_token_dataset(
      str(tmp_path / "other"), np.zeros((2, 4, 1, 2), int), np.zeros(2, int))
  with pytest.raises(ValueError, match="differ in"):
    tokens_lib.concatenate_token_datasets(str(tmp_path / "bad"),
                                          [parts[0], other])
  assert not os.path.exists(tmp_path / "bad")


# An object store: gs:// through etils.epath and fsspec, backed by a folder.


def forget_epath_file_systems():
  """epath keeps the fsspec file system it made first (for another fake
  store, say): make it ask fsspec again."""
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=protected-access
  backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs://bucket/... -> tmp_path/gcs/bucket/...; the local copies go to
  tmp_path/cache; the working directory is tmp_path/cwd, where a folder
  named `gs:` would appear if a URL were ever taken for a local path."""
  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("TensorFlow is installed: etils.epath would read gs:// "
                "through tf.io.gfile, not the fake fsspec store.")
  for name in ("gcs", "cache", "cwd"):
    (tmp_path / name).mkdir()
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  monkeypatch.chdir(tmp_path / "cwd")
  # The uninstall function of helpers.install_fake_gcs fails (it edits
  # fsspec.registry, a read-only view); pytest restores the registry itself.
  # pylint: disable-next=protected-access
  registry = importlib.import_module("fsspec.registry")._registry
  for protocol in ("gs", "gcs"):
    monkeypatch.setitem(registry, protocol, registry.get(protocol))
  helpers.install_fake_gcs(tmp_path / "gcs")
  forget_epath_file_systems()
  try:
    yield tmp_path / "gcs"
  finally:
    forget_epath_file_systems()
    assert not [folder for folder, _, _ in os.walk(tmp_path)
                if os.path.basename(folder).startswith("gs:")]


def test_cache_round_trips_through_an_object_store(data_config, fake_gcs,
                                                   tmp_path):
  config = tokenizer_config(data_config)
  local = token_cache.write_token_cache(config, fake_encode,
                                        str(tmp_path / "local"), CODEBOOK)
  url = "gs://bucket/run/tokens/train"
  assert not tokens_lib.is_token_dataset(url)
  assert token_cache.write_token_cache(config, fake_encode, url,
                                       CODEBOOK) == url
  stored = fake_gcs / "bucket" / "run" / "tokens" / "train"
  assert helpers.file_bytes(stored) == helpers.file_bytes(local)
  assert tokens_lib.is_token_dataset(url)
  assert tokens_lib.read_metadata(url) == tokens_lib.read_metadata(local)
  assert os.listdir(tmp_path / "cwd") == []

  # Stage 2 memory-maps a local copy, made once.
  source = tokens_lib.TokenSource(url)
  assert repr(source) == f"TokenSource({url!r})"
  assert source.local_path.startswith(str(tmp_path / "cache"))
  np.testing.assert_array_equal(source.tokens,
                                tokens_lib.TokenSource(local).tokens)
  assert isinstance(source.tokens, np.memmap)
  copied_at = os.stat(os.path.join(source.local_path,
                                   tokens_lib.TOKENS_FILE)).st_mtime_ns
  again = tokens_lib.TokenSource(url)
  assert again.local_path == source.local_path
  assert os.stat(os.path.join(again.local_path, tokens_lib.TOKENS_FILE)
                 ).st_mtime_ns == copied_at
  batch = next(tokens_lib.make_token_iterator(
      url, global_batch_size=5, seed=0, process_index=0, process_count=1))
  assert batch["tokens"].shape == (5, 4)

  # A second run keeps the cache.
  never = Recorder(fail_on_call=1)
  assert token_cache.write_token_cache(config, never, url, CODEBOOK) == url
  assert never.shapes == []


def test_object_store_copies_follow_rewrites_and_commit_last(fake_gcs):
  url = "gs://bucket/tokens"
  tokens = np.arange(24).reshape(6, 1, 2, 2)
  tokens_lib.write_token_dataset(url, tokens, np.arange(6), {"a": 1})
  first = tokens_lib.TokenSource(url)
  np.testing.assert_array_equal(first.tokens, tokens)
  # Written again with the same metadata (say, by a retrained tokenizer):
  # the copy is made anew.
  tokens_lib.write_token_dataset(url, tokens + 1, np.arange(6), {"a": 1},
                                 overwrite=True)
  marker = fake_gcs / "bucket" / "tokens" / tokens_lib.METADATA_FILE
  later = os.stat(marker).st_mtime + 5  # The store's clock has seconds.
  os.utime(marker, (later, later))
  np.testing.assert_array_equal(tokens_lib.TokenSource(url).tokens,
                                tokens + 1)
  np.testing.assert_array_equal(first.tokens, tokens)  # Still readable.

  # An upload cut short (arrays, no metadata file) is no dataset, and the
  # next writer replaces it; anything else there is never written over.
  marker.unlink()
  assert not tokens_lib.is_token_dataset(url)
  with pytest.raises(FileNotFoundError, match="No token dataset"):
    tokens_lib.TokenSource(url)
  tokens_lib.write_token_dataset(url, tokens, np.arange(6))
  assert len(tokens_lib.TokenSource(url)) == 6
  (fake_gcs / "bucket" / "other").mkdir()
  (fake_gcs / "bucket" / "other" / "notes.txt").write_text("x")
  with pytest.raises(FileExistsError, match="not empty"):
    tokens_lib.write_token_dataset("gs://bucket/other", tokens, np.arange(6))


def test_parts_on_an_object_store_concatenate(fake_gcs, tmp_path):
  tokens = np.arange(40).reshape(5, 2, 2, 2)
  labels = np.arange(5)
  whole = tokens_lib.write_token_dataset(str(tmp_path / "whole"), tokens,
                                         labels, {"m": 1})
  parts = [tokens_lib.write_token_dataset("gs://bucket/parts/0", tokens[:2],
                                          labels[:2], {"m": 1}),
           tokens_lib.write_token_dataset(str(tmp_path / "p1"), tokens[2:],
                                          labels[2:], {"m": 1})]
  joined = tokens_lib.concatenate_token_datasets("gs://bucket/joined", parts)
  assert joined == "gs://bucket/joined"
  assert helpers.file_bytes(fake_gcs / "bucket" / "joined") == (
      helpers.file_bytes(whole))
  assert os.listdir(tmp_path / "cache") == []  # Parts were read from tmp.
