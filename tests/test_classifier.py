"""The small classifier behind the demo's FID, precision/recall and CAS."""

import os

import jax
import numpy as np
import pytest

from maskgit_jax.evaluation import classifier

NUM_CLASSES = 4
# A tiny network: the tests check behaviour, not Fashion-MNIST accuracy.
SMALL = dict(widths=(8, 16), feature_dim=32, batch_size=32, progress=False)


def patterns(n, seed):
  """Four flip- and shift-robust classes: rows, columns, a square, nothing."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % NUM_CLASSES
  grid = np.arange(32)
  shapes = np.stack([
      np.broadcast_to((grid[:, None] // 2) % 2, (32, 32)),
      np.broadcast_to((grid[None, :] // 2) % 2, (32, 32)),
      np.pad(np.ones((16, 16)), 8),
      np.zeros((32, 32)),
  ]) * 180
  images = shapes[labels] + rng.integers(0, 60, (n, 32, 32))
  images = np.clip(images, 0, 255).astype(np.uint8)
  return np.repeat(images[..., None], 3, axis=-1), labels


@pytest.fixture(scope="module")
def toy():
  return patterns(256, seed=0), patterns(128, seed=1)


@pytest.fixture(scope="module")
def trained(toy):
  (images, labels), _ = toy
  return classifier.train_classifier(images, labels, num_classes=NUM_CLASSES,
                                     num_steps=40, seed=0, **SMALL)


def test_learns_a_separable_toy_set(toy, trained):
  _, (test_images, test_labels) = toy
  assert classifier.accuracy(trained, test_images, test_labels) >= 0.95


def test_same_seed_same_params_other_seed_other_params(toy):
  (images, labels), _ = toy
  train = lambda seed: classifier.train_classifier(
      images, labels, num_classes=NUM_CLASSES, num_steps=3, seed=seed,
      **SMALL)
  first, again, other = train(0), train(0), train(1)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(first), jax.tree.leaves(other)))


def test_outputs_shapes_dtypes_and_padded_batches(toy, trained):
  _, (images, _) = toy
  features, logits = classifier.classifier_outputs(trained, images[:7],
                                                   batch_size=3)
  assert features.shape == (7, 32) and features.dtype == np.float32
  assert logits.shape == (7, NUM_CLASSES) and logits.dtype == np.float32
  whole = classifier.classifier_outputs(trained, images[:7], batch_size=7)
  np.testing.assert_allclose(features, whole[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits, whole[1], rtol=1e-5, atol=1e-5)
  assert (features >= 0).all()  # post-ReLU features
  empty = classifier.classifier_outputs(trained, images[:0])
  assert empty[0].shape == (0, 32) and empty[1].shape == (0, NUM_CLASSES)


def test_save_load_round_trip_is_exact(toy, trained, tmp_path):
  _, (images, _) = toy
  path = tmp_path / "sub" / "classifier.npz"
  metadata = {"dataset": "toy", "test_accuracy": 0.97, "steps": [1, 2]}
  classifier.save_classifier(path, trained, metadata)
  assert os.listdir(path.parent) == ["classifier.npz"]  # no temp file left
  params, loaded_metadata = classifier.load_classifier(str(path))
  assert loaded_metadata == metadata
  assert (jax.tree.structure(params) == jax.tree.structure(trained))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(trained)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  for a, b in zip(classifier.classifier_outputs(params, images[:5]),
                  classifier.classifier_outputs(trained, images[:5])):
    np.testing.assert_array_equal(a, b)
  with np.load(path, allow_pickle=False) as data:  # loads without pickle
    assert "params/conv_0/kernel" in data.files


def test_save_overwrites_and_refuses_unserialisable_metadata(trained,
                                                             tmp_path):
  path = tmp_path / "c.npz"
  classifier.save_classifier(path, trained, {"v": 1})
  classifier.save_classifier(path, trained, {"v": 2})
  assert classifier.load_classifier(path)[1] == {"v": 2}
  with pytest.raises(TypeError, match="JSON"):
    classifier.save_classifier(path, trained, {"v": object()})
  assert classifier.load_classifier(path)[1] == {"v": 2}


def test_missing_or_foreign_file_is_a_clear_error(tmp_path):
  missing = tmp_path / "nope.npz"
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    classifier.load_classifier(missing)
  foreign = tmp_path / "foreign.npz"
  np.savez(foreign, mu=np.zeros(3))
  with pytest.raises(ValueError, match="not a classifier file"):
    classifier.load_classifier(foreign)


def test_augment_keeps_shape_dtype_and_constant_images():
  key = jax.random.key(0)
  constant = np.full((4, 32, 32, 3), 77, np.uint8)
  out = np.asarray(classifier.augment_images(constant, key))
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, constant)  # edge padding adds nothing
  rows = np.repeat(np.arange(32, dtype=np.uint8)[:, None], 32, 1)
  images = np.broadcast_to(rows[None, :, :, None], (64, 32, 32, 3))
  shifted = np.asarray(classifier.augment_images(images, key, max_shift=2))
  first_rows = shifted[:, 0, 0, 0]
  assert set(first_rows.tolist()) <= {0, 1, 2}  # shifts of at most 2
  assert len(set(first_rows.tolist())) > 1


def test_batches_are_full_and_each_epoch_a_permutation():
  batches = list(classifier.batch_indices(10, 4, 5, seed=0))
  assert [len(b) for b in batches] == [4] * 5
  flat = np.concatenate(batches)
  assert sorted(flat[:10]) == sorted(flat[10:]) == list(range(10))
  np.testing.assert_array_equal(
      flat, np.concatenate(list(classifier.batch_indices(10, 4, 5, seed=0))))


@pytest.mark.parametrize("images, labels, kwargs, match", [
    (np.zeros((4, 32, 32, 3), np.float32), [0, 1, 2, 3], {}, "uint8"),
    (np.zeros((4, 32, 32, 1), np.uint8), [0, 1, 2, 3], {}, r"\[N, H, W, 3\]"),
    (np.zeros((4, 32, 32), np.uint8), [0, 1, 2, 3], {}, r"\[N, H, W, 3\]"),
    (np.zeros((4, 32, 32, 3), np.uint8), [0, 1, 2], {}, r"shape \(4,\)"),
    (np.zeros((4, 32, 32, 3), np.uint8), [0, 1, 2, 4], {}, r"\[0, 4\)"),
    (np.zeros((4, 32, 32, 3), np.uint8), [0, 1, 2, -1], {}, r"\[0, 4\)"),
    (np.zeros((4, 32, 32, 3), np.uint8), [0., 1., 2., 3.], {}, "integers"),
    (np.zeros((0, 32, 32, 3), np.uint8), [], {}, "empty"),
    (np.zeros((4, 32, 32, 3), np.uint8), [0, 1, 2, 3], {"num_steps": 0},
     "num_steps=0"),
    (np.zeros((4, 32, 32, 3), np.uint8), [0, 1, 2, 3], {"batch_size": -1},
     "batch_size=-1"),
    (np.zeros((4, 30, 30, 3), np.uint8), [0, 1, 2, 3], {}, "divisible by 4"),
    (np.zeros((4, 32, 32, 3), np.uint8), [0, 1, 2, 3], {"max_shift": -1},
     "max_shift=-1"),
    (np.zeros((4, 32, 32, 3), np.uint8), [0, 1, 2, 3], {"num_classes": 1},
     "num_classes=1"),
])
def test_bad_training_input_is_a_value_error(images, labels, kwargs, match):
  args = dict(num_classes=NUM_CLASSES, num_steps=1, seed=0, **SMALL)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    classifier.train_classifier(images, np.asarray(labels), **args)


def test_bad_inference_input_is_a_value_error(toy, trained):
  _, (images, labels) = toy
  with pytest.raises(ValueError, match="size it was trained on"):
    classifier.classifier_outputs(trained, np.zeros((2, 64, 64, 3), np.uint8))
  with pytest.raises(ValueError, match="uint8"):
    classifier.classifier_outputs(trained, images / 255.0)
  with pytest.raises(ValueError, match=r"\[0, 4\)"):
    classifier.accuracy(trained, images[:2], np.array([0, 7]))
  with pytest.raises(ValueError, match="Not classifier parameters"):
    classifier.classifier_outputs({"dense": {}}, images[:2])
