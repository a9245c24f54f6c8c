"""Streaming feature statistics equal batch statistics; feature reservoirs
are uniform, deterministic subsets; both merge within and across
processes (simulated here; for real in test_evaluation_distributed.py)."""

import threading

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from maskgit_jax import evaluation
from maskgit_jax.evaluation import distributed


def features(n=103, dim=12, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) + 5.0
          ).astype(np.float32)


def streamed(x, sizes, **kwargs):
  stats = evaluation.FeatureStats(**kwargs)
  bounds = np.cumsum([0] + list(sizes))
  assert bounds[-1] == len(x)
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    stats.update(x[lo:hi])
  return stats


def assert_batch_statistics(stats, x):
  x64 = x.astype(np.float64)
  assert stats.count == len(x)
  np.testing.assert_allclose(stats.mu, x64.mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(stats.sigma, np.cov(x64, rowvar=False),
                             rtol=1e-10, atol=1e-10)
  assert stats.mu.dtype == stats.sigma.dtype == np.float64


def test_streaming_equals_batch_statistics_over_uneven_batches():
  x = features()
  assert_batch_statistics(streamed(x, [1, 7, 50, 0, 45]), x)
  assert_batch_statistics(streamed(x, [103]), x)


def test_merges_in_any_order_equal_batch_statistics():
  x = features(seed=1)
  a, b, c = (streamed(x[:20], [20]), streamed(x[20:21], [1]),
             streamed(x[21:], [30, 52]))
  assert_batch_statistics(a.merge(b).merge(c), x)
  assert_batch_statistics(c.merge(a.merge(b)), x)
  assert_batch_statistics(evaluation.FeatureStats().merge(a.merge(b)
                                                          ).merge(c), x)
  assert a.count == 20  # merge leaves its inputs alone


def test_update_accepts_jax_arrays_sharded_over_devices():
  x = features(n=64, seed=2)
  mesh = jax.make_mesh((len(jax.devices()),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
  stats = evaluation.FeatureStats(dim=12)
  stats.update(distributed.local_rows(sharded))
  assert_batch_statistics(stats, x)


def test_feature_stats_rejects_bad_input():
  stats = evaluation.FeatureStats()
  with pytest.raises(ValueError, match=r"shape \[batch, dim\]"):
    stats.update(np.zeros(5))
  stats.update(np.zeros((1, 4)))
  with pytest.raises(ValueError, match="at least 2 are needed"):
    _ = stats.sigma
  with pytest.raises(ValueError, match="dimension 3, but these statistics "
                     "have dimension 4"):
    stats.update(np.zeros((2, 3)))
  with pytest.raises(ValueError, match="non-finite"):
    stats.update(np.full((2, 4), np.nan))
  with pytest.raises(ValueError, match="Cannot merge statistics of "
                     "dimension 4 and 3"):
    stats.merge(evaluation.FeatureStats(dim=3))
  with pytest.raises(ValueError, match="keep features"):
    stats.merge(evaluation.FeatureStats(keep=5))
  with pytest.raises(ValueError, match="keep no features"):
    _ = stats.features
  with pytest.raises(ValueError, match="keep must be"):
    evaluation.FeatureStats(keep=-1)

# ---------------------------------------------------------------- reservoir


def row_ids(rows):
  """Each test row's first column is its index in the stream."""
  return rows[:, 0].astype(int).tolist()


def stream(n, dim=3):
  x = np.zeros((n, dim), np.float32)
  x[:, 0] = np.arange(n)
  return x


def test_reservoir_keeps_everything_in_order_while_it_fits():
  stats = streamed(stream(30), [4, 0, 11, 15], keep=30)
  assert row_ids(stats.features) == list(range(30))
  assert stats.features.dtype == np.float32


def test_reservoir_is_a_deterministic_subset():
  x = stream(100)
  sizes = [7, 30, 1, 62]
  kept = row_ids(streamed(x, sizes, keep=10, seed=5).features)
  assert len(kept) == len(set(kept)) == 10 and set(kept) <= set(range(100))
  assert kept == row_ids(streamed(x, sizes, keep=10, seed=5).features)
  assert kept != row_ids(streamed(x, sizes, keep=10, seed=6).features)


def inclusion_frequencies(make, n, trials):
  counts = np.zeros(n)
  for seed in range(trials):
    counts[row_ids(make(seed).rows)] += 1
  return counts / trials


def test_reservoir_updates_and_merges_are_uniform():
  """Every row is kept with probability keep / n, whatever the batching and
  merging (4 sigma bounds over 1500 seeds)."""
  n, keep, trials = 24, 6, 1500
  x = stream(n)
  bound = 4 * np.sqrt(0.25 * 0.75 / trials)

  def batched(seed):
    r = evaluation.Reservoir(keep, seed)
    for lo, hi in [(0, 2), (2, 9), (9, 10), (10, 24)]:
      r.update(x[lo:hi])
    return r

  def merged(seed):
    a, b = evaluation.Reservoir(keep, seed), evaluation.Reservoir(keep, seed)
    a.update(x[:4])
    b.update(x[4:])
    return a.merge(b)

  for make in (batched, merged):
    freq = inclusion_frequencies(make, n, trials)
    assert np.all(np.abs(freq - keep / n) < bound), (make.__name__, freq)


def test_reservoir_rejects_bad_input():
  with pytest.raises(ValueError, match="capacity must be a positive"):
    evaluation.Reservoir(0)
  r = evaluation.Reservoir(4)
  with pytest.raises(ValueError, match="empty"):
    _ = r.rows
  r.update(np.zeros((2, 3)))
  with pytest.raises(ValueError, match="dimension 5 cannot join"):
    r.update(np.zeros((2, 5)))
  with pytest.raises(ValueError, match="capacity 4 and 3"):
    r.merge(evaluation.Reservoir(3))

# ------------------------------------------------ across (fake) processes


def simulate_processes(per_process, function):
  """Runs function(item, allgather, process_index) in one thread per
  simulated process; allgather stacks every thread's array."""
  count = len(per_process)
  barrier = threading.Barrier(count)
  slots = [None] * count
  results = [None] * count
  errors = []

  def run(index):
    def allgather(array):
      slots[index] = np.array(array)
      barrier.wait()
      gathered = np.stack(slots)
      barrier.wait()
      return gathered
    try:
      results[index] = function(per_process[index], allgather, index)
    except Exception as error:  # pylint: disable=broad-except
      errors.append(error)
      barrier.abort()

  threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  if errors:
    raise errors[0]
  return results


def test_merge_across_processes_equals_statistics_of_all_rows(monkeypatch):
  x = features(n=90, seed=3)
  x[:, 0] = np.arange(90)
  # Process 2 holds nothing; chunks of 3 rows exercise the chunked sum.
  parts = [streamed(x[:50], [20, 30], keep=40, seed=1),
           streamed(x[50:], [40], keep=40, seed=1),
           evaluation.FeatureStats(keep=40, seed=1)]
  monkeypatch.setattr(distributed, "CHUNK_BYTES", 3 * 12 * 8)
  results = simulate_processes(parts, distributed.merge_across_processes)
  for merged in results:
    assert_batch_statistics(merged, x)
    np.testing.assert_array_equal(merged.total_outer,
                                  results[0].total_outer)
    assert merged.reservoir.count == 90
    assert row_ids(merged.features) == row_ids(results[0].features)
  kept = row_ids(results[0].features)
  assert len(kept) == len(set(kept)) == 40 and set(kept) <= set(range(90))


def test_merge_across_processes_keeps_all_rows_when_they_fit():
  x = stream(20)
  parts = [streamed(x[:8], [8], keep=50), streamed(x[8:], [5, 7], keep=50)]
  results = simulate_processes(parts, distributed.merge_across_processes)
  assert row_ids(results[1].features) == list(range(20))


def test_merge_across_processes_refuses_mismatched_processes():
  parts = [streamed(features(dim=3), [103]), streamed(features(dim=4), [103])]
  with pytest.raises(ValueError, match=r"different dimensions \[3, 4\]"):
    simulate_processes(parts, distributed.merge_across_processes)
  parts = [streamed(features(), [103], keep=5), streamed(features(), [103])]
  with pytest.raises(ValueError, match="different numbers of features"):
    simulate_processes(parts, distributed.merge_across_processes)


def test_single_process_merge_is_a_copy():
  stats = streamed(features(), [50, 53], keep=10)
  merged = distributed.merge_across_processes(stats)
  assert merged is not stats
  np.testing.assert_array_equal(merged.sigma, stats.sigma)
  np.testing.assert_array_equal(merged.features, stats.features)
  # host_allgather is exact for 64-bit data even without jax_enable_x64.
  values = np.array([1 / 3, 1e-300, 2.0**60 + 1], np.float64)
  gathered = distributed.host_allgather(values)
  assert gathered.shape == (1, 3) and gathered.dtype == np.float64
  np.testing.assert_array_equal(gathered[0], values)
  big = np.array([2**62 + 7], np.int64)
  np.testing.assert_array_equal(distributed.host_allgather(big)[0], big)
