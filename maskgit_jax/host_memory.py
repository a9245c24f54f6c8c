"""Keep freed host memory in the process, so XLA:CPU steps stop page-faulting.

XLA:CPU allocates each executable's buffers afresh on every call. With
glibc's defaults, blocks over the mmap threshold are mapped and unmapped
per call, and the per-thread arenas give their free tops back to the
kernel; the next step then faults every page in again, zero-filled. On a
2-core machine that was 20% of the CPU time (system time) of a transformer
train step, and the step ran 13-19% faster without it (benchmarks/RESULTS.md).

`keep_freed_memory()` tells glibc to serve every block from the one main
heap (no mmap, one arena) and never to trim it, which is what XLA's
repeated, same-sized allocations want. The process then keeps its peak
heap until it exits, as a caching allocator would: the 8-layer 16x16
benchmark step (1 GB of XLA temporaries) held 3.8-4.8 GB instead of 1.9 GB
and ran 0.8 s a step instead of 1.06. The heap reaches that size over
the first steps: on a slower 2-core machine (2026-12-07) the same step
took 2.9-4.2 s over steps 4-8, then 0.95-1.25 s (1.3-1.45 s without these
settings, 1.4-1.7 s with only fixed mmap and trim thresholds), so time a
step only after a few warm-up steps. The setting is
process-wide, so only entry points call it (main.py, the demo, the
benchmarks), not the library; MASKGIT_KEEP_FREED_MEMORY=0 turns it off.
Elsewhere than glibc (or when it is off) nothing changes.
"""

import ctypes
import os

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = -1  # mallopt(M_TRIM_THRESHOLD, -1): trimming is off.

# The same settings as environment variables, for a process started by
# another (the benchmarks' workers, PyTorch ones included): glibc reads
# them before the program runs. The threshold is 1 TiB, i.e. never.
GLIBC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_ARENA_MAX": "1",
             "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def _glibc():
  """The process's own C library if it is glibc (no ldconfig lookup)."""
  libc = ctypes.CDLL(None)
  if not hasattr(libc, "gnu_get_libc_version"):
    return None  # musl, macOS: their allocators are left as they are.
  return libc


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to keep freed memory; True if it was applied.

  Call it at start-up, before the first JAX computation starts XLA's
  threads (arenas made before that keep their old behaviour).
  """
  if os.environ.get("MASKGIT_KEEP_FREED_MEMORY", "1") == "0":
    return False
  libc = _glibc()
  if libc is None:
    return False
  settings = ((_M_MMAP_MAX, 0), (_M_ARENA_MAX, 1),
              (_M_TRIM_THRESHOLD, _NEVER_TRIM))
  return all(libc.mallopt(param, value) == 1 for param, value in settings)
