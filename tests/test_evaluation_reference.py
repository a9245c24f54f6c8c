"""Reference statistics files: our npz cache (round trip, cache paths, no
pickle) and the ADM evaluator's reference-batch layout (mu, sigma, mu_s,
sigma_s, arr_0 images or features), read from synthetic files of that
layout."""

import os

import numpy as np
import pytest

from maskgit_jax import evaluation
from maskgit_jax.evaluation import reference


def random_reference(dim=8, with_features=True):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(30, dim))
  return evaluation.ReferenceStats(
      x.mean(0), np.cov(x, rowvar=False),
      x[:12].astype(np.float32) if with_features else None)


@pytest.mark.parametrize("with_features", [True, False])
def test_reference_round_trip(tmp_path, with_features):
  saved = random_reference(with_features=with_features)
  path = evaluation.save_reference(tmp_path / "cache" / "ref.npz", saved)
  assert os.listdir(tmp_path / "cache") == ["ref.npz"]  # no temporary left
  with np.load(path, allow_pickle=False) as npz:
    assert set(npz.files) == ({"mu", "sigma", "features"} if with_features
                              else {"mu", "sigma"})
  loaded = evaluation.load_reference(path)
  np.testing.assert_array_equal(loaded.mu, saved.mu)
  np.testing.assert_array_equal(loaded.sigma, saved.sigma)
  assert loaded.mu.dtype == loaded.sigma.dtype == np.float64
  if with_features:
    np.testing.assert_array_equal(loaded.features, saved.features)
    assert loaded.features.dtype == np.float32
  else:
    assert loaded.features is None


def test_reference_from_streamed_statistics(tmp_path):
  x = np.random.default_rng(1).normal(size=(40, 5))
  stats = evaluation.FeatureStats(keep=16).update(x[:25]).update(x[25:])
  ref = evaluation.ReferenceStats.from_feature_stats(stats)
  evaluation.save_reference(tmp_path / "r.npz", ref)
  loaded = evaluation.load_reference(tmp_path / "r.npz")
  np.testing.assert_allclose(loaded.sigma, np.cov(x, rowvar=False),
                             rtol=1e-10)
  assert loaded.features.shape == (16, 5)
  assert evaluation.frechet_distance(loaded.mu, loaded.sigma, stats.mu,
                                     stats.sigma) == 0.0


def test_reference_loading_refuses_pickles_and_other_files(tmp_path):
  np.savez(tmp_path / "pickled.npz", mu=np.zeros(2), sigma=np.eye(2),
           features=np.array([{"a": 1}], dtype=object))
  with pytest.raises(ValueError, match="allow_pickle"):
    evaluation.load_reference(tmp_path / "pickled.npz")
  np.savez(tmp_path / "other.npz", weights=np.zeros(3))
  with pytest.raises(ValueError, match=r"holds \['weights'\], not reference"):
    evaluation.load_reference(tmp_path / "other.npz")
  write_adm_batch(tmp_path / "adm.npz")
  with pytest.raises(ValueError, match="read_adm_reference"):
    evaluation.load_reference(tmp_path / "adm.npz")
  with pytest.raises(FileNotFoundError, match="No reference statistics"):
    evaluation.load_reference(tmp_path / "missing.npz")
  with pytest.raises(ValueError, match=r"mu \[D\] and sigma \[D, D\]"):
    evaluation.ReferenceStats(np.zeros(3), np.eye(4))
  with pytest.raises(ValueError, match=r"shape \[N, 3\]"):
    evaluation.ReferenceStats(np.zeros(3), np.eye(3), np.zeros((2, 4)))


def test_reference_cache_path_is_keyed_by_dataset_split_and_variant():
  path = evaluation.reference_cache_path("/cache", "fashion_mnist", "test")
  assert str(path) == "/cache/fashion_mnist-test.npz"
  assert str(evaluation.reference_cache_path(
      "/cache", "imagenet2012", "validation", "inception-256")) == (
          "/cache/imagenet2012-validation-inception-256.npz")
  sliced = {evaluation.reference_cache_path("/c", "imagenet_resized/64x64",
                                            split).name
            for split in ("train[:10%]", "train[:10]", "train_:10_")}
  assert len(sliced) == 3  # sanitised names stay distinct
  assert all("/" not in name and "[" not in name for name in sliced)
  with pytest.raises(ValueError, match="split must be a non-empty string"):
    evaluation.reference_cache_path("/c", "mnist", "")

# ----------------------------------------------------------------- ADM files


def write_adm_batch(path, images=None, labels=None, compressed=False,
                    dim=8):
  """A file of the ADM reference-batch layout (as in
  VIRTUAL_imagenet256_labeled.npz, with small sizes)."""
  rng = np.random.default_rng(2)
  if images is None:
    images = rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
  x = rng.normal(size=(50, dim))
  arrays = dict(arr_0=images, mu=x.mean(0), sigma=np.cov(x, rowvar=False),
                mu_s=x.mean(0)[:4], sigma_s=np.eye(4))
  if labels is not None:
    arrays["arr_1"] = labels
  (np.savez_compressed if compressed else np.savez)(path, **arrays)
  return arrays


@pytest.mark.parametrize("compressed", [False, True])
def test_adm_reference_batch_of_images_streams(tmp_path, compressed):
  arrays = write_adm_batch(tmp_path / "VIRTUAL_test.npz",
                           compressed=compressed)
  batch = evaluation.read_adm_reference(tmp_path / "VIRTUAL_test.npz")
  assert batch.holds_images and batch.num_examples == 12
  assert batch.arr_0_shape == (12, 16, 16, 3)
  assert batch.arr_0_dtype == np.uint8 and batch.labels is None
  np.testing.assert_array_equal(batch.mu, arrays["mu"])
  np.testing.assert_array_equal(batch.sigma, arrays["sigma"])
  np.testing.assert_array_equal(batch.sigma_spatial, arrays["sigma_s"])
  chunks = list(batch.batches(5))
  assert [len(c) for c in chunks] == [5, 5, 2]
  np.testing.assert_array_equal(np.concatenate(chunks), arrays["arr_0"])
  with pytest.raises(ValueError, match="not features"):
    batch.features()
  features = np.ones((12, 8), np.float32)
  ref = batch.to_reference(features)
  np.testing.assert_array_equal(ref.mu, arrays["mu"])
  np.testing.assert_array_equal(ref.features, features)


def test_adm_reference_batch_of_features_and_labels(tmp_path):
  feats = np.random.default_rng(3).normal(size=(20, 8)).astype(np.float32)
  labels = np.arange(20) % 5
  write_adm_batch(tmp_path / "f.npz", images=feats, labels=labels)
  batch = evaluation.read_adm_reference(tmp_path / "f.npz")
  assert not batch.holds_images
  np.testing.assert_array_equal(batch.labels, labels)
  np.testing.assert_array_equal(batch.features(), feats)
  np.testing.assert_array_equal(batch.to_reference().features, feats)


def test_adm_reading_without_spatial_stats_or_in_fortran_order(tmp_path):
  images = np.asfortranarray(
      np.random.default_rng(4).integers(0, 256, (7, 4, 4, 3), np.uint8))
  rng = np.random.default_rng(5)
  x = rng.normal(size=(9, 3))
  np.savez(tmp_path / "plain.npz", arr_0=images, mu=x.mean(0),
           sigma=np.cov(x, rowvar=False))
  batch = evaluation.read_adm_reference(tmp_path / "plain.npz")
  assert batch.mu_spatial is None and batch.sigma_spatial is None
  np.testing.assert_array_equal(np.concatenate(list(batch.batches(3))),
                                images)


def test_adm_reading_rejects_bad_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="guided-diffusion"):
    evaluation.read_adm_reference(tmp_path / "VIRTUAL_imagenet256_labeled.npz")
  np.savez(tmp_path / "no_images.npz", mu=np.zeros(2), sigma=np.eye(2))
  with pytest.raises(ValueError, match=r"lacks \['arr_0'\]"):
    evaluation.read_adm_reference(tmp_path / "no_images.npz")
  write_adm_batch(tmp_path / "rgba.npz",
                  images=np.zeros((2, 4, 4, 4), np.uint8))
  with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
    evaluation.read_adm_reference(tmp_path / "rgba.npz")
  write_adm_batch(tmp_path / "wrong_dim.npz", images=np.zeros((3, 5)))
  with pytest.raises(ValueError, match=r"features \[N, 8\]"):
    evaluation.read_adm_reference(tmp_path / "wrong_dim.npz")
  np.savez(tmp_path / "objects.npz", arr_0=np.array([None, 1], dtype=object))
  with pytest.raises(ValueError, match="pickle"):
    list(reference.iter_npz_batches(tmp_path / "objects.npz", "arr_0", 1))
  with pytest.raises(ValueError, match="has no array 'arr_9'"):
    list(reference.iter_npz_batches(tmp_path / "objects.npz", "arr_9", 1))
  with pytest.raises(ValueError, match="batch_size"):
    list(reference.iter_npz_batches(tmp_path / "objects.npz", "arr_0", 0))
