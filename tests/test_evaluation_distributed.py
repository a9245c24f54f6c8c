"""Feature statistics of a real two-process job (localhost, gloo): each
process reads its rows of a global batch, streams them, and the merged
statistics on both processes are exactly those of all rows, in float64
although JAX runs without x64."""

import json
import os
import sys

import numpy as np
import pytest

import helpers

DIM, ROWS_PER_PROCESS, KEEP = 6, 40, 50


def process_rows(process_id):
  rng = np.random.default_rng(100 + process_id)
  rows = (rng.normal(size=(ROWS_PER_PROCESS, DIM)) / 3 + 1).astype(np.float32)
  rows[:, 0] = process_id * ROWS_PER_PROCESS + np.arange(ROWS_PER_PROCESS)
  return rows


def worker(process_id, port):
  """One process: prints `RESULT {json}` with what the test checks."""
  # pylint: disable=import-outside-toplevel
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from maskgit_jax import evaluation
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=2, process_id=process_id)
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  local = process_rows(process_id)
  batch = jax.make_array_from_process_local_data(
      NamedSharding(mesh, P("data")), local)
  stats = evaluation.FeatureStats(keep=KEEP, seed=7)
  for half in np.split(evaluation.local_rows(batch), [15]):
    stats.update(half)
  merged = evaluation.merge_across_processes(stats)
  replicated = jax.make_array_from_process_local_data(
      NamedSharding(mesh, P()), process_rows(0))
  print("RESULT " + json.dumps({
      "process": process_id,
      "x64": bool(jax.config.jax_enable_x64),
      "local_is_mine": bool(np.array_equal(evaluation.local_rows(batch),
                                           local)),
      "replicated_rows": len(evaluation.local_rows(replicated)),
      "count": merged.count,
      "total": merged.total.tolist(),
      "total_outer": merged.total_outer.tolist(),
      "kept": merged.features[:, 0].astype(int).tolist(),
  }), flush=True)
  jax.distributed.shutdown()


@pytest.mark.slow  # two JAX processes: ~5 s
def test_two_processes_merge_to_the_statistics_of_all_rows():
  port = helpers.free_port()
  results = helpers.run_two_processes(lambda i: [
      sys.executable, os.path.abspath(__file__), str(i), str(port)])
  # Expected sums, in the order the merge adds them (process 0 + process 1).
  sums = []
  for process_id in (0, 1):
    rows = process_rows(process_id).astype(np.float64)
    sums.append((rows[:15].sum(0) + rows[15:].sum(0),
                 rows[:15].T @ rows[:15] + rows[15:].T @ rows[15:]))
  for result in results.values():
    assert not result["x64"]
    assert result["local_is_mine"]
    assert result["count"] == 2 * ROWS_PER_PROCESS
    np.testing.assert_array_equal(result["total"], sums[0][0] + sums[1][0])
    np.testing.assert_array_equal(result["total_outer"],
                                  sums[0][1] + sums[1][1])
    assert result["kept"] == results[0]["kept"]
  # Each replicated row is read by exactly one process.
  assert sorted(r["replicated_rows"] for r in results.values()) == [
      0, ROWS_PER_PROCESS]
  kept = results[0]["kept"]
  assert len(kept) == len(set(kept)) == KEEP
  assert set(kept) <= set(range(2 * ROWS_PER_PROCESS))


if __name__ == "__main__":
  worker(int(sys.argv[1]), int(sys.argv[2]))
