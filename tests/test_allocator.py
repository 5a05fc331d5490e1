"""keep_freed_memory() against glibc.

Where a freed block lands depends on everything the process allocated before (a small object placed
after a big block keeps the heap from shrinking; glibc's dynamic mmap threshold follows the largest
block freed so far), so counting page faults inside the test process passes or fails with the order of
the tests. The probe runs in a fresh interpreter that allocates with libc's own malloc and nothing in
between, and reads glibc's counters (mallinfo2) besides the minor page faults.
"""
import json
import subprocess
import sys

import pytest

from lineage.engine import allocator

PROBE = r"""
import ctypes, json, resource
from lineage.engine import allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = allocator._LIBC
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
BLOCK = 4 << 20  # a piece's temporary in a streaming merge

def allocate_touch_free(count):
    # minor page faults, and how many of the blocks glibc served with a fresh mmap
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    mapped = 0
    for _ in range(count):
        mapped_before = libc.mallinfo2().hblks
        block = libc.malloc(BLOCK)
        mapped += libc.mallinfo2().hblks - mapped_before
        ctypes.memset(block, 1, BLOCK)
        libc.free(block)
    return {"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, "mapped": mapped}

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

with allocator.keep_freed_memory():
    allocate_touch_free(1)  # the heap grows once
    inside = allocate_touch_free(20)
    kept_free = libc.mallinfo2().fordblks
    block, pin = libc.malloc(BLOCK), libc.malloc(64)  # the small block keeps the heap from shrinking
    ctypes.memset(block, 1, BLOCK)
    libc.free(block)
    held = resident()
    allocator.release_freed_memory()
    released = held - resident()
    libc.free(pin)
after = allocate_touch_free(20)
print(json.dumps({"block": BLOCK, "inside": inside, "kept_free": kept_free, "after": after,
                  "heap_after": libc.mallinfo2().arena, "released": released}))
"""

needs_glibc = pytest.mark.skipif(allocator._LIBC is None or not hasattr(allocator._LIBC, "mallinfo2"),
                                 reason="glibc >= 2.33 (mallopt, malloc_trim, mallinfo2) is not available here")


@pytest.fixture(scope="module")
def probe() -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@needs_glibc
def test_while_active_freed_blocks_stay_in_the_process_and_serve_the_next_allocation(probe):
    assert probe["inside"]["mapped"] == 0  # 4 MiB blocks come from the heap, not from mmap
    assert probe["inside"]["faults"] < probe["block"] // 4096  # 20 blocks fault in less than one block's pages
    assert probe["kept_free"] >= probe["block"]  # the freed block stays in the heap


@needs_glibc
def test_afterwards_glibc_defaults_are_back_and_the_kept_memory_is_returned(probe):
    assert probe["after"]["mapped"] == 20  # above the default 128 KiB threshold: every block is mapped afresh
    assert probe["after"]["faults"] >= 20  # and faulted in again (4 KiB pages: 1,024 faults per block)
    assert probe["heap_after"] < probe["block"]  # malloc_trim gave the kept block back to the kernel


@needs_glibc
def test_release_returns_freed_memory_while_active(probe):
    assert probe["released"] >= probe["block"] // 2  # a freed block behind a live one leaves the process


def test_nesting_keeps_the_setting_until_the_outermost_exit():
    with allocator.keep_freed_memory():
        with allocator.keep_freed_memory():
            pass
        assert allocator._active == (1 if allocator._LIBC is not None else 0)
    assert allocator._active == 0
