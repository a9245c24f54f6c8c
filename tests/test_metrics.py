"""Metrics against references with known answers: Frechet distance (scipy,
closed forms, exact low-rank identities), Inception Score, improved
precision/recall and CAS."""

import numpy as np
import pytest
from scipy import linalg, special, stats

from maskgit_jax import evaluation
from maskgit_jax.evaluation import frechet

# ------------------------------------------------------------------ Frechet


def moments(x):
  return x.mean(axis=0), np.cov(x, rowvar=False)


def scipy_frechet(mu1, sigma1, mu2, sigma2):
  """The textbook formula via scipy.linalg.sqrtm (fine when well
  conditioned)."""
  covmean = linalg.sqrtm(sigma1 @ sigma2)
  assert np.allclose(np.imag(covmean), 0, atol=1e-8)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2 * np.trace(np.real(covmean)))


@pytest.mark.parametrize("seed,n,dim", [(0, 500, 8), (1, 300, 32),
                                        (2, 1000, 64)])
def test_frechet_matches_scipy_when_well_conditioned(seed, n, dim):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim))
  y = rng.normal(size=(n, dim)) * rng.uniform(0.5, 2, dim) + 0.3
  want = scipy_frechet(*moments(x), *moments(y))
  got = evaluation.frechet_distance(*moments(x), *moments(y))
  assert got == pytest.approx(want, rel=1e-9)


def test_frechet_of_identical_inputs_is_zero():
  rng = np.random.default_rng(3)
  for n, dim in [(400, 16), (10, 64)]:  # full rank and rank 9 of 64
    mu, sigma = moments(rng.normal(size=(n, dim)) * 5 + 2)
    assert evaluation.frechet_distance(mu, sigma, mu.copy(),
                                       sigma.copy()) == 0.0
    # The formula itself (no shortcut) agrees: tr((S S)^1/2) = tr(S).
    assert frechet.trace_sqrt_product(sigma, sigma) == pytest.approx(
        np.trace(sigma), rel=1e-10)
    # Float32-rounded copies: tiny, never negative.
    d = evaluation.frechet_distance(mu, sigma, mu.astype(np.float32),
                                    sigma.astype(np.float32))
    assert 0.0 <= d < 1e-4


def low_rank_reference(x1, x2):
  """Exact FID of sample moments when n < dim: the non-zero eigenvalues of
  S1 S2 are the squared singular values of X1c X2c^T / (n - 1), a small
  n x n matrix (X centred)."""
  c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
  cross = c1 @ c2.T / np.sqrt((len(x1) - 1) * (len(x2) - 1))
  diff = x1.mean(0) - x2.mean(0)
  return float(diff @ diff + np.sum(c1**2) / (len(x1) - 1)
               + np.sum(c2**2) / (len(x2) - 1)
               - 2 * np.sum(np.linalg.svd(cross, compute_uv=False)))


@pytest.mark.parametrize("seed,n1,n2,dim", [(0, 10, 10, 64), (1, 10, 25, 64),
                                            (2, 5, 40, 128),
                                            (3, 60, 200, 256)])
def test_frechet_rank_deficient_is_exact(seed, n1, n2, dim):
  rng = np.random.default_rng(seed)
  x1 = rng.normal(size=(n1, dim))
  x2 = rng.normal(size=(n2, dim)) * 1.5 + 0.2
  got = evaluation.frechet_distance(*moments(x1), *moments(x2))
  assert np.isfinite(got) and isinstance(got, float)
  assert got == pytest.approx(low_rank_reference(x1, x2), rel=1e-9)


def test_frechet_closed_form_for_commuting_singular_covariances():
  """Commuting S1 = Q A Q^T, S2 = Q B Q^T (diagonal A, B, many zeros):
  d = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
  rng = np.random.default_rng(4)
  dim = 48
  a = rng.uniform(0.1, 4, dim) * (rng.uniform(size=dim) < 0.4)
  b = rng.uniform(0.1, 4, dim) * (rng.uniform(size=dim) < 0.6)
  q = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
  mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
  want = np.sum((mu1 - mu2)**2) + np.sum((np.sqrt(a) - np.sqrt(b))**2)
  assert evaluation.frechet_distance(mu1, np.diag(a), mu2,
                                     np.diag(b)) == pytest.approx(want,
                                                                  rel=1e-12)
  rotated = evaluation.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2,
                                        q @ np.diag(b) @ q.T)
  assert rotated == pytest.approx(want, rel=1e-8)


def test_frechet_rejects_bad_input():
  mu, sigma = np.zeros(3), np.eye(3)
  with pytest.raises(ValueError, match="same length"):
    evaluation.frechet_distance(mu, sigma, np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match=r"sigma2 must be a \(3, 3\)"):
    evaluation.frechet_distance(mu, sigma, mu, np.eye(4))
  with pytest.raises(ValueError, match="mu1 must be a 1-D"):
    evaluation.frechet_distance(sigma, sigma, mu, sigma)
  with pytest.raises(ValueError, match="non-finite"):
    evaluation.frechet_distance(mu, np.full((3, 3), np.nan), mu, sigma)
  with pytest.raises(ValueError, match="not symmetric"):
    evaluation.frechet_distance(mu, np.triu(np.ones((3, 3))), mu, sigma)

# ---------------------------------------------------------- Inception Score


def test_inception_score_of_uniform_predictions_is_one():
  score = evaluation.inception_score(np.zeros((100, 1008)))
  assert score.mean == pytest.approx(1.0, abs=1e-12)
  assert score.std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("scale", [50.0, 1e4])  # 1e4: p underflows to 0
def test_inception_score_of_confident_distinct_classes_is_class_count(scale):
  classes = 10
  logits = scale * np.eye(classes)[np.arange(200) % classes]
  mean, std = evaluation.inception_score(logits)
  assert mean == pytest.approx(classes, rel=1e-9)
  assert std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_matches_definition_with_uneven_splits():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(25, 7)) * 3  # splits of 2 or 3 samples
  probs = special.softmax(logits, axis=1)
  bounds = [i * 25 // 10 for i in range(11)]
  scores = [np.exp(np.mean([stats.entropy(p, probs[lo:hi].mean(0))
                            for p in probs[lo:hi]]))
            for lo, hi in zip(bounds[:-1], bounds[1:])]
  got = evaluation.inception_score(logits)
  assert got.mean == pytest.approx(np.mean(scores), rel=1e-10)
  assert got.std == pytest.approx(np.std(scores), rel=1e-8)
  # 50,000 samples: 10 splits of 5,000, as the ADM evaluator cuts them.
  assert [hi - lo for lo, hi in zip(
      [i * 50000 // 10 for i in range(10)],
      [i * 50000 // 10 for i in range(1, 11)])] == [5000] * 10


def test_inception_score_rejects_bad_input():
  with pytest.raises(ValueError, match="shape"):
    evaluation.inception_score(np.zeros(10))
  with pytest.raises(ValueError, match="5 samples cannot fill 10 splits"):
    evaluation.inception_score(np.zeros((5, 3)))
  with pytest.raises(ValueError, match="num_splits"):
    evaluation.inception_score(np.zeros((5, 3)), num_splits=0)
  with pytest.raises(ValueError, match="non-finite"):
    evaluation.inception_score(np.full((10, 3), np.inf))

# -------------------------------------------------------- precision/recall


def brute_force_precision_recall(real, fake, k=3):
  """Full float64 distance matrices; radius = k-th neighbour, self
  excluded."""
  def radii(x):
    d = np.sum((x[:, None] - x[None]) ** 2, axis=-1)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, k - 1]

  cross = np.sum((fake[:, None] - real[None]) ** 2, axis=-1)
  precision = np.mean(np.any(cross <= radii(real)[None], axis=1))
  recall = np.mean(np.any(cross.T <= radii(fake)[None], axis=1))
  return precision, recall


def on_a_line(positions, dim=16, seed=0):
  """Points at `positions` along a random direction in `dim` dimensions."""
  rng = np.random.default_rng(seed)
  direction = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:, 0]
  return np.outer(positions, direction).astype(np.float32)


def test_precision_recall_of_identical_sets_is_one():
  x = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
  assert evaluation.precision_recall(x, x.copy()) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero():
  rng = np.random.default_rng(1)
  real = rng.normal(size=(40, 8))
  fake = rng.normal(size=(30, 8)) + 100.0
  assert evaluation.precision_recall(real, fake) == (0.0, 0.0)


@pytest.mark.parametrize("block_size", [1, 3, 7, 10_000])
def test_precision_recall_known_fractions(block_size):
  """Real points 0..9 on a line (radius 2, 3 at the ends); fake points
  0.1..4.1 (radius 2, 3 at the ends) and five far away. Every near fake is
  real-like, no far one: precision 5/10. The near fakes' balls cover reals
  0..7 (8 is 3.9 from 4.1 > 3): recall 8/10."""
  real = on_a_line(np.arange(10.0))
  near = np.arange(5) + 0.1
  fake = np.concatenate([on_a_line(near),
                         on_a_line(near) + 1000.0])
  result = evaluation.precision_recall(real, fake, block_size=block_size)
  assert result == pytest.approx((0.5, 0.8))
  assert result.precision == pytest.approx(0.5)


def test_manifold_radii_exclude_self_count_duplicates():
  radii = evaluation.manifold_radii(on_a_line(np.arange(10.0)), k=3,
                                    block_size=4)
  np.testing.assert_allclose(radii, [9] + [4] * 8 + [9], rtol=1e-4)
  # A point repeated 3 times: its neighbours are its 2 copies and 1 away.
  copies = on_a_line(np.array([0.0, 0.0, 0.0, 1.0, 5.0]))
  np.testing.assert_allclose(
      evaluation.manifold_radii(copies, k=2), [0, 0, 0, 1, 25], atol=1e-4)


@pytest.mark.parametrize("seed,n_real,n_fake,block_size",
                         [(0, 57, 43, 8), (1, 30, 90, 16), (2, 64, 64, 64),
                          (3, 20, 11, 5)])
def test_precision_recall_matches_brute_force(seed, n_real, n_fake,
                                              block_size):
  rng = np.random.default_rng(seed)
  real = rng.normal(size=(n_real, 6))
  fake = rng.normal(size=(n_fake, 6)) * 1.3 + 0.4
  got = evaluation.precision_recall(real, fake, block_size=block_size)
  assert got == pytest.approx(brute_force_precision_recall(real, fake))
  assert 0 < got.precision < 1  # a non-trivial case


def test_precision_recall_rejects_bad_input():
  x = np.zeros((10, 4))
  with pytest.raises(ValueError, match="dimension 4 but fake_features"):
    evaluation.precision_recall(x, np.zeros((10, 5)))
  with pytest.raises(ValueError, match="3 points have no 3-th nearest"):
    evaluation.precision_recall(np.zeros((3, 4)), x)
  with pytest.raises(ValueError, match="block_size must be a positive"):
    evaluation.precision_recall(x, x, block_size=0)
  with pytest.raises(ValueError, match=r"real_features must have shape"):
    evaluation.precision_recall(np.zeros(10), x)
  with pytest.raises(ValueError, match="non-finite"):
    evaluation.precision_recall(x, np.full((10, 4), np.nan))

# ---------------------------------------------------------------------- CAS


def nearest_centroid_trainer(seen):
  def train(images, labels):
    seen.append((images, labels))
    flat = images.reshape(len(images), -1)
    centroids = np.stack([flat[labels == c].mean(0) for c in range(3)])
    return lambda batch: -np.sum(
        (batch.reshape(len(batch), 1, -1) - centroids[None]) ** 2, axis=-1)
  return train


def blobs(n, seed, shuffle_labels=False):
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % 3
  images = rng.normal(size=(n, 4, 4)) * 0.3 + labels[:, None, None] * 2.0
  if shuffle_labels:
    labels = rng.permutation(labels)
  return images, labels


def test_cas_trains_on_generated_only_and_scores_real():
  seen = []
  generated, real = blobs(90, 0), blobs(101, 1)
  cas = evaluation.classification_accuracy_score(
      nearest_centroid_trainer(seen), *generated, *real, batch_size=16)
  assert cas == 1.0
  assert len(seen) == 1 and seen[0][0] is not real[0]
  np.testing.assert_array_equal(seen[0][0], generated[0])
  # Samples that ignore their class condition train a useless classifier.
  bad = evaluation.classification_accuracy_score(
      nearest_centroid_trainer([]), *blobs(90, 0, shuffle_labels=True),
      *real)
  assert bad < 0.7


def test_classifier_accuracy_takes_ids_or_scores_in_batches():
  images, labels = blobs(10, 2)
  calls = []

  def predict(batch):
    calls.append(len(batch))
    return np.zeros(len(batch), np.int64)

  assert evaluation.classifier_accuracy(predict, images, labels,
                                        batch_size=4) == 0.4
  assert calls == [4, 4, 2]
  with pytest.raises(ValueError, match="class ids"):
    evaluation.classifier_accuracy(lambda b: np.zeros((1, 3)), images,
                                   labels)


def test_cas_rejects_bad_input():
  images, labels = blobs(9, 0)
  train = nearest_centroid_trainer([])
  with pytest.raises(ValueError, match=r"labels must be integers of shape"):
    evaluation.classification_accuracy_score(train, images, labels[:5],
                                             images, labels)
  with pytest.raises(ValueError, match="same shape"):
    evaluation.classification_accuracy_score(
        train, images, labels, images.reshape(9, 16), labels)
  with pytest.raises(ValueError, match="batch_size"):
    evaluation.classifier_accuracy(lambda b: b, images, labels,
                                   batch_size=0)
