"""What every benchmark here shares: timing and fresh worker processes.

Each variant runs in its own process (nothing compiled or cached is shared)
with fixed glibc malloc thresholds: without them XLA:CPU can run 2x slower
when memory is handed back to the OS between calls, so both sides of a
comparison get the same setting.
"""

import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Sequence

FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432",
                "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
  """Median wall time of `fn()` (which must block until done), after one
  untimed call that compiles."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def run_worker(args: Sequence[str]) -> float:
  """Runs `python args...` in a fresh process; returns the number it prints
  last."""
  result = subprocess.run([sys.executable, *args], capture_output=True,
                          text=True, check=False,
                          env=dict(os.environ, **FIXED_MALLOC))
  if result.returncode:
    raise SystemExit(f"worker {' '.join(args)} failed:\n"
                     f"{result.stderr[-3000:]}")
  return float(result.stdout.strip().splitlines()[-1])
