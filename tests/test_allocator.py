import resource

import pytest
import torch

from lineage.engine import allocator


def _minor_faults_for(allocations: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(allocations):
        x = torch.empty(1 << 20, dtype=torch.float32)  # 4 MiB, touched, then freed
        x.fill_(1.0)
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(allocator._LIBC is None, reason="glibc's mallopt is not available here")
def test_freed_memory_is_reused_while_active_and_returned_after():
    with allocator.keep_freed_memory():
        _minor_faults_for(5)  # the first allocations fault their pages in (the heap grows)
        inside = _minor_faults_for(20)
    after = _minor_faults_for(20)
    # Afterwards (glibc's fixed defaults) every 4 MiB block is mapped afresh and faulted in again;
    # while active the same memory serves every allocation. (Before, glibc's dynamic threshold
    # depends on the process's history, so it is not asserted on.)
    assert after >= 20
    assert inside * 10 <= after


def test_nesting_keeps_the_setting_until_the_outermost_exit():
    with allocator.keep_freed_memory():
        with allocator.keep_freed_memory():
            pass
        assert allocator._active == (1 if allocator._LIBC is not None else 0)
    assert allocator._active == 0
