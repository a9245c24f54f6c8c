"""Data package: TFDS builders, grain pipelines and the token cache.

Everything runs on tiny synthetic files under tmp_path. Fashion-MNIST images
are constant (value 7 * i + 3 for record i); resizing keeps a constant image
constant, so every output image tells which record it came from.
"""

import gzip
import json
import os
import pickle

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from maskgit_jax.data import fashion_mnist
from maskgit_jax.data import image_folder
from maskgit_jax.data import input_pipeline
from maskgit_jax.data import sources
from maskgit_jax.data import tokens as token_data

NUM_TRAIN, NUM_TEST = 24, 10


def write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  data = header + np.ascontiguousarray(array, np.uint8).tobytes()
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(data)


def fake_fashion_split(n, offset):
  values = 7 * (np.arange(n) + offset) + 3
  images = np.broadcast_to(values[:, None, None], (n, 28, 28)).astype(np.uint8)
  labels = ((np.arange(n) + offset) * 7 % 10).astype(np.uint8)
  return images, labels


def record_ids(images):
  """Record ids of constant images (see the module docstring)."""
  values = np.round(images.mean(axis=(1, 2, 3)) * 255)
  assert np.all(values % 7 == 3), values
  return ((values - 3) // 7).astype(int)


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
  """Train files gzipped (as the Debian package ships them), test plain."""
  root = str(tmp_path_factory.mktemp("fashion_idx"))
  images, labels = fake_fashion_split(NUM_TRAIN, 0)
  write_idx(os.path.join(root, "train-images-idx3-ubyte.gz"), images)
  write_idx(os.path.join(root, "train-labels-idx1-ubyte.gz"), labels)
  images, labels = fake_fashion_split(NUM_TEST, NUM_TRAIN)
  write_idx(os.path.join(root, "t10k-images-idx3-ubyte"), images)
  write_idx(os.path.join(root, "t10k-labels-idx1-ubyte"), labels)
  return root


@pytest.fixture(scope="module")
def fashion_config(fashion_dir, tmp_path_factory):
  config = input_pipeline.default_data_config()
  config.data_dir = str(tmp_path_factory.mktemp("tfds"))
  config.source_dir = fashion_dir
  config.image_size = 32
  sources.prepare(config)
  return config


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# Fashion-MNIST idx builder.


def test_read_idx_gzipped_and_plain(fashion_dir):
  images, labels = fashion_mnist.read_split(fashion_dir, "train")
  want_images, want_labels = fake_fashion_split(NUM_TRAIN, 0)
  np.testing.assert_array_equal(images, want_images)
  np.testing.assert_array_equal(labels, want_labels)
  images, labels = fashion_mnist.read_split(fashion_dir, "test")
  assert images.shape == (NUM_TEST, 28, 28) and labels.shape == (NUM_TEST,)


def test_missing_idx_files_error_names_dir_files_and_apt(tmp_path):
  config = input_pipeline.default_data_config()
  config.data_dir = str(tmp_path / "tfds")
  config.source_dir = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError) as error:
    sources.build_source(config, "train")
  message = str(error.value)
  assert str(tmp_path / "nowhere") in message
  assert "train-images-idx3-ubyte" in message
  assert "t10k-labels-idx1-ubyte" in message
  assert "apt-get install dataset-fashion-mnist" in message


def test_fashion_source_holds_the_idx_records(fashion_config):
  source = sources.build_source(fashion_config, "test")
  assert len(source) == NUM_TEST
  want_images, want_labels = fake_fashion_split(NUM_TEST, NUM_TRAIN)
  by_value = {int(v): int(l) for v, l in zip(want_images[:, 0, 0], want_labels)}
  for i in range(len(source)):
    example = source[i]
    assert example["image"].shape == (28, 28, 1)
    assert example["image"].dtype == np.uint8
    value = int(example["image"][0, 0, 0])
    assert by_value[value] == int(example["label"])
  assert sources.num_classes(fashion_config) == 10


def test_train_batches_shapes_range_and_labels(fashion_config):
  iterator = input_pipeline.make_image_iterator(
      fashion_config, split="train", global_batch_size=8, seed=0, train=True,
      process_index=0, process_count=1)
  _, labels = fake_fashion_split(NUM_TRAIN, 0)
  seen = []
  for batch in take(iterator, 3):  # One epoch.
    assert batch["image"].shape == (8, 32, 32, 3)
    assert batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    ids = record_ids(batch["image"])
    np.testing.assert_array_equal(batch["label"], labels[ids])
    seen.extend(ids)
  assert sorted(seen) == list(range(NUM_TRAIN))  # Shuffled, each once.
  assert seen != sorted(seen)


def test_augmentation_changes_real_images(fashion_config):
  """Crops and flips move pixels; grayscale becomes three equal channels."""
  image = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28, 1) % 251
  augment = input_pipeline.image_transforms(fashion_config, train=True)[0]
  outputs = [augment.random_map({"image": image, "label": 3},
                                np.random.default_rng(i))["image"]
             for i in range(4)]
  for out in outputs:
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
  assert any(np.abs(a - outputs[0]).max() > 0.05 for a in outputs[1:])
  evaluate = input_pipeline.image_transforms(fashion_config, train=False)[0]
  out = evaluate.map({"image": image, "label": 3})
  assert out["image"].shape == (32, 32, 3) and out["label"] == 3


def test_eval_batches_cover_split_once_in_order(fashion_config):
  iterator = input_pipeline.make_image_iterator(
      fashion_config, split="test", global_batch_size=4, seed=0, train=False,
      process_index=0, process_count=1)
  batches = list(iterator)
  assert [len(b["label"]) for b in batches] == [4, 4, 2]
  images = np.concatenate([b["image"] for b in batches])
  assert sorted(record_ids(images)) == list(range(NUM_TRAIN,
                                                  NUM_TRAIN + NUM_TEST))


def test_same_seed_same_batches_other_seed_other_batches(fashion_config):
  def batches(seed):
    return take(input_pipeline.make_image_iterator(
        fashion_config, split="train", global_batch_size=8, seed=seed,
        train=True, process_index=0, process_count=1), 4)
  first = batches(3)
  assert_batches_equal(first, batches(3))
  other = batches(4)
  assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_resume_from_state_yields_the_same_next_batches(fashion_config):
  def make():
    return input_pipeline.make_image_iterator(
        fashion_config, split="train", global_batch_size=8, seed=1,
        train=True, process_index=0, process_count=1)
  iterator = make()
  take(iterator, 2)
  state = iterator.get_state()
  assert isinstance(state, bytes)
  expected = take(iterator, 5)  # Crosses two epoch boundaries.
  resumed = make()
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 5), expected)
  # A new epoch is a new order of all records.
  epoch_2 = np.concatenate([record_ids(b["image"]) for b in expected[1:4]])
  assert sorted(epoch_2) == list(range(NUM_TRAIN))


def test_processes_read_disjoint_shards_covering_the_data(fashion_config):
  shards = []
  for index in range(2):
    iterator = input_pipeline.make_image_iterator(
        fashion_config, split="train", global_batch_size=8, seed=0,
        train=True, num_epochs=1, process_index=index, process_count=2)
    batches = list(iterator)
    assert all(b["image"].shape == (4, 32, 32, 3) for b in batches)
    shards.append(set(np.concatenate([record_ids(b["image"])
                                      for b in batches]).tolist()))
  assert not shards[0] & shards[1]
  assert shards[0] | shards[1] == set(range(NUM_TRAIN))


def test_batch_must_split_over_processes(fashion_config):
  with pytest.raises(ValueError, match="global_batch_size=7"):
    input_pipeline.make_image_iterator(fashion_config, split="train",
                                 global_batch_size=7, seed=0, train=True,
                                 process_index=0, process_count=2)


def test_bad_crop_scale_is_rejected(fashion_config):
  config = fashion_config.copy_and_resolve_references()
  config.random_resized_crop_scale = (0.0, 1.0)
  with pytest.raises(ValueError, match="random_resized_crop_scale"):
    input_pipeline.image_transforms(config, train=True)


def test_random_crop_box_stays_inside_with_the_drawn_ratio():
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, right, bottom = input_pipeline.random_crop_box(
        30, 50, rng, scale=(0.5, 1.0), ratio=(0.75, 1.5))
    assert 0 <= left < right <= 50 + 1e-9 and 0 <= top < bottom <= 30 + 1e-9
    assert 0.75 - 1e-9 <= (right - left) / (bottom - top) <= 1.5 + 1e-9
  assert input_pipeline.center_square_box(30, 50) == (10, 0, 40, 30)


# Image folders.


def save_image(path, array, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  PIL.Image.fromarray(array).save(path, **kwargs)


@pytest.fixture
def folder(tmp_path):
  """Two classes, mixed sizes and modes, one corrupt and one truncated file."""
  root = tmp_path / "pets"
  rng = np.random.default_rng(0)
  save_image(str(root / "dog" / "a.png"), rng.integers(0, 255, (20, 30, 3),
                                                       dtype=np.uint8))
  save_image(str(root / "dog" / "nested" / "b.jpg"),
             rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), quality=95)
  save_image(str(root / "cat" / "gray.png"),
             rng.integers(0, 255, (12, 18), dtype=np.uint8))
  save_image(str(root / "cat" / "alpha.png"),
             rng.integers(0, 255, (10, 10, 4), dtype=np.uint8))
  (root / "cat" / "corrupt.jpg").write_bytes(b"not an image at all")
  png = (root / "dog" / "a.png").read_bytes()
  (root / "dog" / "truncated.png").write_bytes(png[:len(png) // 2])
  (root / "cat" / "notes.txt").write_text("ignored: not an image")
  return root


def folder_config(root, data_dir, **overrides):
  config = input_pipeline.default_data_config()
  config.name = "image_folder"
  config.source_dir = str(root)
  config.data_dir = str(data_dir)
  config.image_size = 8
  config.eval_split = "train"
  config.update(overrides)
  return config


def test_image_folder_skips_and_counts_corrupt_files(folder, tmp_path):
  config = folder_config(folder, tmp_path / "tfds")
  source = sources.build_source(config, "train")
  assert len(source) == 4
  labels = sorted(int(source[i]["label"]) for i in range(4))
  assert labels == [0, 0, 1, 1]  # cat = 0, dog = 1: sorted folder names.
  assert all(source[i]["image"].shape[-1] == 3 for i in range(4))
  builder = sources.prepare(config)
  assert builder.info.features["label"].names == ["cat", "dog"]
  assert sorted(builder.info.metadata["skipped_files"]) == [
      os.path.join("cat", "corrupt.jpg"), os.path.join("dog", "truncated.png")]
  batch = next(input_pipeline.make_image_iterator(
      config, split="train", global_batch_size=4, seed=0, train=False,
      process_index=0, process_count=1))
  assert batch["image"].shape == (4, 8, 8, 3)
  assert batch["image"].dtype == np.float32


def test_image_folder_can_fail_naming_the_corrupt_file(folder, tmp_path):
  (folder / "dog" / "truncated.png").unlink()
  config = folder_config(folder, tmp_path / "tfds", skip_corrupt_images=False)
  with pytest.raises(ValueError, match="corrupt.jpg"):
    sources.build_source(config, "train")


def test_empty_or_missing_image_folder_errors(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no class sub-folders"):
    sources.build_source(folder_config(tmp_path / "empty", tmp_path), "train")
  (tmp_path / "empty" / "cls").mkdir()
  with pytest.raises(ValueError, match="no image files"):
    sources.build_source(folder_config(tmp_path / "empty", tmp_path), "train")
  with pytest.raises(FileNotFoundError, match="missing"):
    sources.build_source(folder_config(tmp_path / "missing", tmp_path), "train")


def test_image_folder_validation_split_partitions_the_images(tmp_path):
  root = tmp_path / "many"
  for i in range(12):
    save_image(str(root / f"c{i % 3}" / f"{i}.png"),
               np.full((6, 6, 3), i, np.uint8))
  config = folder_config(root, tmp_path / "tfds", validation_fraction=0.5)
  train = sources.build_source(config, "train")
  validation = sources.build_source(config, "validation")
  values = [int(s[i]["image"][0, 0, 0]) for s in (train, validation)
            for i in range(len(s))]
  assert sorted(values) == list(range(12))
  assert len(train) and len(validation)
  assert image_folder.in_validation("c0/0.png", 0.5) == \
      image_folder.in_validation("c0/0.png", 0.5)


# Source selection.


class MaskgitTestCatalogue(tfds.core.GeneratorBasedBuilder):
  """A registered (catalogue) dataset with an extra feature, as imagenet2012."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(num_classes=3),
        "file_name": tfds.features.Text(),
    })
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    return {"validation": self._generate_examples(6)}

  def _generate_examples(self, n):
    for i in range(n):
      image = PIL.Image.fromarray(np.full((9, 12, 3), 7 * i + 3, np.uint8))
      yield i, {"image": image, "label": i % 3, "file_name": f"{i}.png"}


def test_catalogue_dataset_prepared_as_array_record(tmp_path):
  config = input_pipeline.default_data_config()
  config.name = "maskgit_test_catalogue"
  config.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError,
                     match="tfds build maskgit_test_catalogue"):
    sources.build_source(config, "validation")
  MaskgitTestCatalogue(data_dir=str(tmp_path),
                       file_format="array_record").download_and_prepare()
  assert len(sources.build_source(config, "validation")) == 6
  batches = list(input_pipeline.make_image_iterator(
      config, split="validation", global_batch_size=4, seed=0, train=False,
      process_index=0, process_count=1))
  assert sorted(batches[0]) == ["image", "label"]  # file_name dropped.
  ids = np.concatenate([record_ids(b["image"]) for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert sorted(ids) == list(range(6))
  np.testing.assert_array_equal(labels, ids % 3)


def test_unknown_name_lists_valid_names(tmp_path):
  config = input_pipeline.default_data_config()
  config.name = "no_such_dataset_anywhere"
  config.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match="fashion_mnist, image_folder"):
    sources.build_source(config, "train")


def test_unknown_split_lists_valid_splits(fashion_config):
  with pytest.raises(ValueError, match="'test', 'train'"):
    sources.build_source(fashion_config, "validation")


# Token cache.


def fake_tokens(m=20, h=2, w=3):
  tokens = np.arange(m * h * w, dtype=np.int64).reshape(m, h, w) % 1024
  labels = np.arange(m) % 5
  return tokens, labels


def test_token_dataset_round_trip(tmp_path):
  tokens, labels = fake_tokens()
  target = str(tmp_path / "cache" / "tokens")
  written = token_data.write_token_dataset(
      target, tokens, labels, {"codebook_size": 1024, "split": "train"})
  assert written == target
  assert sorted(os.listdir(tmp_path / "cache")) == ["tokens"]  # No tmp dirs.
  source = token_data.TokenSource(target)
  assert len(source) == 20 and source.token_shape == (2, 3)
  assert source.metadata == {"codebook_size": 1024, "split": "train"}
  assert token_data.read_metadata(target) == source.metadata
  assert source.num_views == 1  # [M, h, w] is stored as one view each.
  for i in (0, 7, 19):
    assert source[i]["tokens"].dtype == np.int32
    np.testing.assert_array_equal(source[i]["tokens"], tokens[i][None])
    assert source[i]["label"] == labels[i]
  assert isinstance(source.tokens, np.memmap)
  # Worker processes receive the path, not the arrays.
  clone = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(clone[5]["tokens"], tokens[5][None])
  assert len(pickle.dumps(source)) < 500


def test_token_dataset_is_never_overwritten_silently(tmp_path):
  tokens, labels = fake_tokens()
  target = str(tmp_path / "tokens")
  token_data.write_token_dataset(target, tokens, labels)
  with pytest.raises(FileExistsError, match="already exists"):
    token_data.write_token_dataset(target, tokens[:4], labels[:4])
  assert len(token_data.TokenSource(target)) == 20
  token_data.write_token_dataset(target, tokens[:4], labels[:4],
                                 overwrite=True)
  assert len(token_data.TokenSource(target)) == 4
  assert sorted(os.listdir(tmp_path)) == ["tokens"]
  other = tmp_path / "other"
  other.mkdir()
  (other / "keep.txt").write_text("x")
  with pytest.raises(FileExistsError, match="not empty"):
    token_data.write_token_dataset(str(other), tokens, labels, overwrite=True)
  with pytest.raises(ValueError, match="integer"):
    token_data.write_token_dataset(str(tmp_path / "f"), tokens * 0.5, labels)


def test_missing_token_dataset_message_can_be_extended(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    token_data.make_token_iterator(
        str(tmp_path / "absent"), global_batch_size=4, seed=0,
        missing_hint="Run main.py --mode=tokenize first.")
  assert str(tmp_path / "absent") in str(error.value)
  assert str(error.value).endswith("Run main.py --mode=tokenize first.")
  with pytest.raises(FileNotFoundError, match="absent"):
    token_data.read_metadata(str(tmp_path / "absent"))


def test_token_iterator_batches_resume_and_shards(tmp_path):
  tokens, labels = fake_tokens()
  target = token_data.write_token_dataset(str(tmp_path / "t"), tokens, labels)

  def make(**kwargs):
    args = dict(global_batch_size=4, seed=2, process_index=0, process_count=1)
    args.update(kwargs)
    return token_data.make_token_iterator(target, **args)

  iterator = make()
  batch = next(iterator)
  assert batch["tokens"].shape == (4, 6) and batch["tokens"].dtype == np.int32
  assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
  rows = batch["tokens"][:, 0] // 6  # Row i starts at token 6 * i.
  np.testing.assert_array_equal(batch["tokens"], tokens.reshape(20, 6)[rows])
  np.testing.assert_array_equal(batch["label"], labels[rows])
  state = iterator.get_state()
  expected = take(iterator, 7)  # Into the second epoch.
  resumed = make()
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 7), expected)
  assert_batches_equal(take(make(), 8), [batch] + expected)

  grid = next(make(flatten=False))
  assert grid["tokens"].shape == (4, 2, 3)

  seen = []
  for index in range(2):
    shard = make(num_epochs=1, process_index=index, process_count=2)
    rows = np.concatenate([b["tokens"][:, 0] // 6 for b in shard])
    assert len(rows) == 10
    seen.append(set(rows.tolist()))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(20))


def multi_view_tokens(m=20, views=3, h=2, w=3):
  """Every token of view v of example i is views * i + v."""
  values = views * np.arange(m)[:, None] + np.arange(views)[None, :]
  tokens = np.broadcast_to(values[:, :, None, None], (m, views, h, w))
  return np.ascontiguousarray(tokens), np.arange(m) % 5


def test_streaming_writer_fills_batches_and_commits_atomically(tmp_path):
  tokens, labels = multi_view_tokens()
  target = str(tmp_path / "tokens")
  with token_data.TokenDatasetWriter(
      target, num_examples=20, num_views=3, token_shape=(2, 3),
      metadata={"num_views": 3}) as writer:
    for start in range(0, 20, 8):  # 8, 8, 4
      assert not token_data.is_token_dataset(target)
      writer.append(tokens[start:start + 8], labels[start:start + 8])
  assert sorted(os.listdir(tmp_path)) == ["tokens"]
  source = token_data.TokenSource(target)
  assert len(source) == 20 and source.num_views == 3
  assert source.token_shape == (2, 3) and isinstance(source.tokens, np.memmap)
  np.testing.assert_array_equal(source.tokens, tokens)
  np.testing.assert_array_equal(source.labels, labels)
  assert source[4]["tokens"].shape == (3, 2, 3)
  with open(os.path.join(target, token_data.METADATA_FILE)) as f:
    info = json.load(f)
  assert info["format_version"] == 2 and info["num_views"] == 3
  assert info["num_examples"] == 20 and info["token_shape"] == [2, 3]


def test_interrupted_writes_never_look_complete(tmp_path):
  tokens, labels = multi_view_tokens()
  target = str(tmp_path / "tokens")
  with pytest.raises(RuntimeError, match="crash"):
    with token_data.TokenDatasetWriter(target, num_examples=20, num_views=3,
                                       token_shape=(2, 3)) as writer:
      writer.append(tokens[:8], labels[:8])
      raise RuntimeError("crash")
  assert os.listdir(tmp_path) == []  # Nothing left, not even the tmp dir.
  with pytest.raises(ValueError, match="Only 8 of 20"):
    with token_data.TokenDatasetWriter(target, num_examples=20, num_views=3,
                                       token_shape=(2, 3)) as writer:
      writer.append(tokens[:8], labels[:8])
  assert os.listdir(tmp_path) == []
  # A process killed mid-write leaves only its hidden temporary directory,
  # which is no dataset either.
  writer = token_data.TokenDatasetWriter(target, num_examples=20,
                                         num_views=3, token_shape=(2, 3))
  writer.append(tokens[:8], labels[:8])
  assert not token_data.is_token_dataset(target)
  assert all(not token_data.is_token_dataset(str(tmp_path / name))
             for name in os.listdir(tmp_path))
  writer.abort()
  with token_data.TokenDatasetWriter(target, num_examples=20, num_views=3,
                                     token_shape=(2, 3)) as writer:
    with pytest.raises(ValueError, match=r"\[n, 3, 2, 3\]"):
      writer.append(tokens[:4, :2], labels[:4])
    with pytest.raises(ValueError, match="exceed the 20"):
      writer.append(np.concatenate([tokens, tokens[:1]]),
                    np.concatenate([labels, labels[:1]]))
    writer.append(tokens, labels)
  assert len(token_data.TokenSource(target)) == 20
  with pytest.raises(ValueError, match="num_views=0"):
    token_data.TokenDatasetWriter(str(tmp_path / "x"), num_examples=2,
                                  num_views=0, token_shape=(2, 3))


def test_token_iterator_draws_one_view_per_example_per_epoch(tmp_path):
  tokens, labels = multi_view_tokens()
  target = token_data.write_token_dataset(str(tmp_path / "t"), tokens, labels)

  def make(seed=2, shuffle=True):
    return token_data.make_token_iterator(
        target, global_batch_size=4, seed=seed, shuffle=shuffle,
        process_index=0, process_count=1)

  def epochs(batches):
    values = np.concatenate([b["tokens"] for b in batches])
    assert values.shape[1] == 6 and np.all(values == values[:, :1])
    examples, views = values[:, 0] // 3, values[:, 0] % 3
    np.testing.assert_array_equal(
        np.concatenate([b["label"] for b in batches]), labels[examples])
    return examples.reshape(-1, 20), views.reshape(-1, 20)

  for shuffle in (False, True):
    batches = take(make(shuffle=shuffle), 50)  # 10 epochs of 5 batches.
    assert batches[0]["tokens"].shape == (4, 6)
    assert batches[0]["tokens"].dtype == np.int32
    examples, views = epochs(batches)
    for epoch in examples:
      assert sorted(epoch) == list(range(20))  # Each example once an epoch.
    by_example = np.take_along_axis(views, np.argsort(examples, axis=1), 1)
    assert not np.all(by_example == by_example[:1])  # Epochs draw anew...
    assert 40 <= np.bincount(views.ravel(), minlength=3).min()  # ... evenly.
  same = take(make(), 10)
  assert_batches_equal(same, take(make(), 10))
  assert not all(np.array_equal(a["tokens"], b["tokens"])
                 for a, b in zip(same, take(make(seed=3), 10)))
  iterator = make()
  take(iterator, 3)
  state = iterator.get_state()
  expected = take(iterator, 8)  # Crosses an epoch boundary.
  resumed = make()
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 8), expected)


def test_version_1_token_datasets_still_read(tmp_path):
  """A cache written before views existed: tokens [M, h, w], format 1."""
  tokens, labels = fake_tokens()
  target = tmp_path / "v1"
  target.mkdir()
  np.save(target / token_data.TOKENS_FILE, tokens.astype(np.int32))
  np.save(target / token_data.LABELS_FILE, labels.astype(np.int32))
  (target / token_data.METADATA_FILE).write_text(json.dumps(
      {"format_version": 1, "num_examples": 20, "token_shape": [2, 3],
       "metadata": {"codebook_size": 1024}}))
  source = token_data.TokenSource(str(target))
  assert source.num_views == 1 and source.token_shape == (2, 3)
  np.testing.assert_array_equal(source[7]["tokens"], tokens[7][None])
  batch = next(token_data.make_token_iterator(
      str(target), global_batch_size=4, seed=0, shuffle=False,
      process_index=0, process_count=1))
  np.testing.assert_array_equal(batch["tokens"], tokens[:4].reshape(4, 6))
  np.testing.assert_array_equal(batch["label"], labels[:4])
  (target / token_data.METADATA_FILE).write_text(json.dumps(
      {"format_version": 3, "num_examples": 20, "token_shape": [2, 3],
       "metadata": {}}))
  with pytest.raises(ValueError, match="format version 3"):
    token_data.TokenSource(str(target))


# Views for the token cache.


def test_view_iterator_centre_crops_in_record_order(fashion_config):
  batches = list(input_pipeline.make_view_iterator(
      fashion_config, split="test", global_batch_size=4, num_crops=0,
      flip=True, seed=0, process_index=0, process_count=1))
  assert [b["views"].shape for b in batches] == [
      (4, 2, 32, 32, 3), (4, 2, 32, 32, 3), (2, 2, 32, 32, 3)]
  assert batches[0]["views"].dtype == np.float32
  views = np.concatenate([b["views"] for b in batches])
  source = sources.build_source(fashion_config, "test")  # TFDS's order.
  want = [(int(source[i]["image"][0, 0, 0]) - 3) // 7 for i in range(NUM_TEST)]
  assert sorted(want) == list(range(NUM_TRAIN, NUM_TRAIN + NUM_TEST))
  for v in range(2):
    np.testing.assert_array_equal(record_ids(views[:, v]), want)
  np.testing.assert_array_equal(
      np.concatenate([b["label"] for b in batches]),
      [int(source[i]["label"]) for i in range(NUM_TEST)])
  single = next(input_pipeline.make_view_iterator(
      fashion_config, split="test", global_batch_size=4, num_crops=0,
      flip=False, seed=0, process_index=0, process_count=1))
  assert single["views"].shape == (4, 1, 32, 32, 3)


def test_view_iterator_random_crops_are_seeded_per_record(folder, tmp_path):
  config = folder_config(folder, tmp_path / "tfds")

  def views(seed, batch=4, num_crops=3):
    return np.concatenate([b["views"] for b in input_pipeline.make_view_iterator(
        config, split="train", global_batch_size=batch, num_crops=num_crops,
        flip=True, seed=seed, process_index=0, process_count=1)])

  first = views(0)
  assert first.shape == (4, 6, 8, 8, 3)  # crop0, mirror0, crop1, ...
  np.testing.assert_array_equal(first, views(0))
  np.testing.assert_array_equal(first, views(0, batch=3))  # Per record.
  assert not np.array_equal(first, views(1))
  crops, mirrors = first[:, 0::2], first[:, 1::2]
  np.testing.assert_array_equal(mirrors, crops[:, :, :, ::-1])
  for record in crops:
    for a in range(3):
      for b in range(a):
        assert np.abs(record[a] - record[b]).max() > 0.01
  # Crops are not the centre crop, which is what num_crops=0 stores.
  centre = views(0, num_crops=0)
  assert centre.shape == (4, 2, 8, 8, 3)
  assert not np.array_equal(centre[:, 0], crops[:, 0])


def test_num_views_and_bad_crop_counts():
  assert input_pipeline.num_views(0, True) == 2
  assert input_pipeline.num_views(0, False) == 1
  assert input_pipeline.num_views(10, True) == 20
  assert input_pipeline.num_views(3, False) == 3
  for bad in (-1, 1.5, True, None):
    with pytest.raises(ValueError, match=f"num_crops={bad!r}"):
      input_pipeline.num_views(bad, True)
  with pytest.raises(ValueError, match="flip=1"):
    input_pipeline.num_views(2, 1)


def test_processes_building_one_dataset_at_once_build_it_once(tmp_path):
  """Two processes of a job both find the local dataset missing: the file
  lock lets one build it while the other waits, then both read it."""
  import subprocess
  import sys
  import helpers
  helpers.write_garments(str(tmp_path))
  code = (
      "import sys\n"
      "from maskgit_jax import config_base\n"
      "from maskgit_jax.data import sources\n"
      "c = config_base.from_file('configs/vqgan_fashion_mnist.py', 'tiny')\n"
      "c.data.source_dir, c.data.data_dir = sys.argv[1], sys.argv[2]\n"
      "print('records', len(sources.build_source(c.data, 'train')))\n")
  command = [sys.executable, "-c", code, str(tmp_path), str(tmp_path / "tfds")]
  children = [subprocess.Popen(command, cwd=helpers.REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for _ in range(2)]
  for child in children:
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-2000:]
    assert f"records {helpers.NUM_TRAIN}" in out


# Splits held in memory (data.in_memory).


@pytest.fixture(scope="module")
def garment_config(data_dirs):
  """The session's garment images (not constant: resampling shows in every
  pixel), as a Fashion-MNIST data config."""
  config = input_pipeline.default_data_config()
  config.update(source_dir=data_dirs[0], data_dir=data_dirs[1],
                image_size=32)
  return config


def test_in_memory_source_gives_the_records_and_batches_of_tfds(
    garment_config):
  on_disk = garment_config.copy_and_resolve_references()
  in_memory = garment_config.copy_and_resolve_references()
  in_memory.in_memory = True
  disk, memory = (sources.build_source(c, "train") for c in (on_disk,
                                                              in_memory))
  assert "InMemorySource" in repr(memory) and len(memory) == len(disk)
  for i in range(len(disk)):
    want, got = disk[i], memory[i]
    assert got.keys() == want.keys() and got["label"] == want["label"]
    assert type(got["label"]) is type(want["label"])
    np.testing.assert_array_equal(got["image"], want["image"])
  # Read once per process: every job of the process shares it.
  assert sources.build_source(in_memory, "train") is memory
  # A transform writing into its record leaves the dataset as it was.
  memory[0]["image"][:] = 0
  np.testing.assert_array_equal(memory[0]["image"], disk[0]["image"])

  def batches(config, train):
    return take(input_pipeline.make_image_iterator(
        config, split="train", global_batch_size=4, seed=3, train=train,
        process_index=0, process_count=1), 3)
  for train in (True, False):
    assert_batches_equal(batches(in_memory, train), batches(on_disk, train))
  views = [take(input_pipeline.make_view_iterator(
      c, split="test", global_batch_size=4, num_crops=2, flip=True, seed=1,
      process_index=0, process_count=1), 2) for c in (in_memory, on_disk)]
  assert_batches_equal(*views)


@pytest.mark.parametrize("split,batch_size", [("train", 7), ("test", 64)])
def test_in_memory_eval_batches_are_the_eval_iterators(garment_config, split,
                                                       batch_size):
  """Evaluation passes over a split in memory slice views computed once per
  process: the batches (values, dtypes, a smaller last one) of grain's
  evaluation iterator over the split on disk."""
  in_memory = garment_config.copy_and_resolve_references()
  in_memory.in_memory = True
  want = list(input_pipeline.make_image_iterator(
      garment_config, split=split, global_batch_size=batch_size, seed=0,
      train=False, process_index=0, process_count=1))
  for _ in range(2):  # The second pass reuses the first's views.
    got = list(input_pipeline.eval_batches(in_memory, split=split,
                                           batch_size=batch_size))
    assert_batches_equal(got, want)
    for g, w in zip(got, want):
      assert {k: v.dtype for k, v in g.items()} == {
          k: v.dtype for k, v in w.items()}
  source = sources.build_source(in_memory, split)
  assert input_pipeline.centre_views(source, 32) is input_pipeline.centre_views(
      source, 32)
  # Without data.in_memory the same function is grain's iterator.
  assert_batches_equal(list(input_pipeline.eval_batches(
      garment_config, split=split, batch_size=batch_size)), want)
  # As uint8 pixels both give the floats' pixels, which map back exactly.
  for config in (in_memory, garment_config):
    pixels = list(input_pipeline.eval_batches(
        config, split=split, batch_size=batch_size, uint8=True))
    assert [p["image"].dtype for p in pixels] == [np.uint8] * len(want)
    assert_batches_equal(
        [{**p, "image": input_pipeline.unit_float(p["image"])}
         for p in pixels], want)


def test_in_memory_needs_fields_of_one_shape():
  from maskgit_jax.data import in_memory  # pylint: disable=g-import-not-at-top
  records = [{"image": np.zeros((28, 28, 3), np.uint8), "label": 0},
             {"image": np.zeros((30, 28, 3), np.uint8), "label": 1}]
  with pytest.raises(ValueError, match=r"'image' to have one shape.*"
                     r"data.in_memory=False"):
    in_memory.read_columns(records, "folder train")
