"""The sizes that bound a run's memory, and the executor's share of the estimate `--dry-run` shows.

Nothing here imports torch, so planners can estimate a run without starting one. A run holds
- output slots: OUTPUT_SLOTS_PER_WORKER per worker, each as large as the largest job's outputs
  (their pages are touched lazily, so in practice the largest jobs in flight);
- per worker: its reused read buffers (a chunk of each source, in fp32 and as stored, or a whole
  source tensor for jobs that read whole tensors) and the job's own temporaries — the planner
  knows those (see merge/planner.py's estimate);
- the writer's blocks (lineage/io/direct_write.py).
"""
from __future__ import annotations

from collections.abc import Iterable

from lineage.io import direct_write

# Elements per piece when a job streams its sources chunk by chunk: 1 MiB of fp32 per source, which
# stays in the CPU cache and is large enough that per-operation costs are small. Equal to
# merge/methods.py's SLICE_ELEMENTS, so an elementwise method takes each piece whole.
CHUNK_ELEMENTS = 1 << 18
OUTPUT_SLOTS_PER_WORKER = 4  # jobs in flight per worker: one that finishes early takes more while a long one runs
WHOLE_REUSE_BYTES = 64 << 20  # a worker keeps whole-tensor buffers up to this size (see executor._WorkerBuffers)
SLOT_ALIGN = 64  # each output's offset in its job's slot: any dtype can view it, and no cache line is shared


def executor_bytes(workers: int, job_bytes: Iterable[int]) -> int:
    """The executor's own buffers for jobs whose outputs take `job_bytes`: the output slots of the
    largest jobs that may be in flight, and the writer's blocks."""
    in_flight = sorted(job_bytes, reverse=True)[: OUTPUT_SLOTS_PER_WORKER * workers]
    return sum(in_flight) + direct_write.BLOCKS * direct_write.BLOCK_BYTES
