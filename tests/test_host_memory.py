"""host_memory.keep_freed_memory: large blocks stay in the process heap.

Each check runs in a fresh interpreter, since the setting is process-wide
and this one's arenas already exist.
"""

import os
import subprocess
import sys
import textwrap

import pytest

# Allocates and frees a 64 MiB block; prints whether the setting applied,
# the bytes glibc newly served by mmap for the block, and the heap bytes
# the process still holds after the free (mallinfo2, glibc >= 2.33).
_PROBE = textwrap.dedent("""
    import ctypes
    from maskgit_jax import host_memory

    class MallInfo2(ctypes.Structure):
      _fields_ = [(name, ctypes.c_size_t) for name in (
          "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
          "fsmblks", "uordblks", "fordblks", "keepcost")]

    applied = host_memory.keep_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2
    mapped_before = libc.mallinfo2().hblkhd
    block = libc.malloc(64 << 20)
    ctypes.memset(block, 1, 64 << 20)
    mapped = libc.mallinfo2().hblkhd - mapped_before
    libc.free(block)
    print(applied, mapped, libc.mallinfo2().arena)
    """)

_BLOCK = 64 << 20


def _probe(**env):
  result = subprocess.run([sys.executable, "-c", _PROBE], check=True,
                          capture_output=True, text=True,
                          env=dict(os.environ, **env))
  applied, mapped, heap = result.stdout.split()
  return applied == "True", int(mapped), int(heap)


def _glibc_with_mallinfo2() -> bool:
  try:
    version = os.confstr("CS_GNU_LIBC_VERSION") or ""
  except (ValueError, OSError):
    return False
  parts = version.split()
  if len(parts) != 2 or parts[0] != "glibc":
    return False
  major, minor = (int(x) for x in parts[1].split(".")[:2])
  return (major, minor) >= (2, 33)


pytestmark = pytest.mark.skipif(not _glibc_with_mallinfo2(),
                                reason="needs glibc >= 2.33 (mallinfo2)")


def test_a_large_block_comes_from_the_heap_and_stays_after_free():
  applied, mapped, heap = _probe()
  assert applied
  assert mapped == 0  # not an mmap that free would hand back
  assert heap >= _BLOCK  # still held by the process after free


def test_glibc_defaults_map_a_large_block_and_the_switch_keeps_them():
  # The default behaviour the setting exists to avoid, and the opt-out.
  applied, mapped, heap = _probe(MASKGIT_KEEP_FREED_MEMORY="0")
  assert not applied
  assert mapped >= _BLOCK
  assert heap < _BLOCK
