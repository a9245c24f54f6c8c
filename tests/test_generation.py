"""Generation in batches, as the eval job and the training grids use it."""

import numpy as np
import pytest

from maskgit_jax import Pipeline
from maskgit_jax.evaluation import generation


@pytest.fixture(scope="module")
def pipe():
  return Pipeline.random(seed=0, num_classes=5, image_size=16)


def test_balanced_class_ids():
  ids = generation.balanced_class_ids(23, 5, seed=1)
  counts = np.bincount(ids, minlength=5)
  assert counts.sum() == 23 and counts.max() - counts.min() <= 1
  np.testing.assert_array_equal(ids, generation.balanced_class_ids(23, 5, 1))
  assert not np.array_equal(ids, generation.balanced_class_ids(23, 5, 2))
  with pytest.raises(ValueError, match="num_samples=0"):
    generation.balanced_class_ids(0, 5)


def test_batches_cover_the_classes_in_order_and_repeat_with_the_seed(pipe):
  classes = np.array([4, 0, 1, 3, 2, 2, 1, 0, 4, 3, 0], np.int32)
  run = lambda seed: list(generation.generate_in_batches(
      pipe, classes, batch_size=8, seed=seed, sampling=dict(num_iter=2)))
  first, again, other = run(0), run(0), run(1)
  assert [len(labels) for _, labels in first] == [8, 3]  # last one trimmed
  np.testing.assert_array_equal(
      np.concatenate([labels for _, labels in first]), classes)
  images = np.concatenate([im for im, _ in first])
  assert images.shape == (11, 16, 16, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images,
                                np.concatenate([im for im, _ in again]))
  assert not np.array_equal(images, np.concatenate([im for im, _ in other]))


def test_a_process_share_draws_the_same_images_as_the_whole_job(pipe):
  """Process 1 of 2 takes batches 1, 3, ...: each is seeded by its index
  in the whole job, so together the shares equal one process's images."""
  classes = np.arange(20, dtype=np.int32) % 5
  whole = [im for im, _ in generation.generate_in_batches(
      pipe, classes, batch_size=4, seed=7, sampling=dict(num_iter=2))]
  share = [im for im, _ in generation.generate_in_batches(
      pipe, np.concatenate([classes[4:8], classes[12:16]]), batch_size=4,
      seed=7, sampling=dict(num_iter=2), first_batch=1, batch_stride=2)]
  np.testing.assert_array_equal(share[0], whole[1])
  np.testing.assert_array_equal(share[1], whole[3])
  assert not np.array_equal(share[0], whole[0])


def test_sharding_over_devices_does_not_change_the_images(pipe):
  """8 fake devices (conftest): the batch is split, the samples are not."""
  sharding = generation.local_batch_sharding(8)
  assert sharding is not None
  classes = np.arange(8) % 5
  split = pipe.generate(classes, seed=3, num_iter=2, sharding=sharding)
  whole = pipe.generate(classes, seed=3, num_iter=2)
  np.testing.assert_array_equal(split, whole)


def test_sharded_generation_with_parameters_on_one_device(pipe):
  """Weights restored from a workdir live on one device; sharded
  generation must still run (they are replicated, once)."""
  import jax
  on_one = Pipeline(pipe.tokenizer,
                    jax.device_put(pipe.tokenizer_params, jax.devices()[0]),
                    pipe.transformer,
                    jax.device_put(pipe.transformer_params, jax.devices()[0]),
                    token_shape=pipe.token_shape)
  sharding = generation.local_batch_sharding(8)
  classes = np.arange(8) % 5
  np.testing.assert_array_equal(
      on_one.generate(classes, seed=3, num_iter=2, sharding=sharding),
      pipe.generate(classes, seed=3, num_iter=2))
