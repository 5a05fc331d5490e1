"""The streaming executor: runs a planner's jobs (lineage/engine/jobs.py) over safetensors inputs into
one safetensors output. It knows nothing of SDXL or of merging; the planners do.

Running overlaps reading, computing and writing:
- the calling thread submits the jobs in order to a pool of worker threads (pread, torch and hashing
  release the GIL), after asking the kernel to start reading the tensors each job needs
  (InputFile.prefetch), so a worker finds them in the page cache;
- a worker checks that the job's inputs are unchanged (lineage/engine/inputs.py), hands the job a
  reader per source and a view of each of its outputs inside an output slot, and calls it. Readers
  read into buffers that cost no freshly faulted pages per tensor: recycled by the allocator, or
  kept by the worker where the allocator would not (_WorkerBuffers);
- the calling thread takes finished jobs in file order and gives their outputs to the writer, which
  hashes them (the output's AutoV3) and streams them to disk in large direct-I/O blocks from its own
  threads (lineage/io/direct_write.py); the slot is then reused. A run without an output file (a
  reproduction check) only hashes them;
- another thread hashes the inputs' data sections (their AutoV3) unless the caller knows them.
Memory is bounded by the slots and the workers' buffers (lineage/engine/budget.py), never by the
size of the files. The output file appears at its path only once complete (SafetensorsWriter): an
error, an input changed under the run or a kill leaves the destination as it was. Metadata that
depends on the hashes is written last, into header room the writer keeps for it.

A run computes on a device (`run_jobs(..., device=...)`, lineage/engine/device.py): the CPU by
default, or a CUDA device. Reading, hashing and writing stay on the host either way; the device is
carried by each JobContext, and a compute function moves the fp32 pieces it works on there with
`ctx.to_device(tensor)` (nothing is copied on the CPU), computes, and copies the result into its
output views (`out.copy_(result)` brings it back). Planners use the same code for both: the merge
jobs (merge/jobs.py) are the model.

While a run lasts, torch runs one thread per worker (the workers are the parallelism; torch's own
threads would fight them for the cores), the cycle collector is off and freed memory is kept for
reuse (lineage/engine/allocator.py): jobs allocate and free a few temporaries per chunk, and both the
collector's passes and freshly faulted pages would be pure cost.
"""
from __future__ import annotations

import gc
import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from lineage.errors import LineageError
from lineage.io.safetensors import DTYPES, SafetensorsWriter, TensorInfo, tensor_bytes

from .allocator import KEEP_MMAP_THRESHOLD, keep_freed_memory
from .budget import CHUNK_ELEMENTS, OUTPUT_SLOTS_PER_WORKER, SLOT_ALIGN, WHOLE_REUSE_BYTES
from .inputs import InputFile
from .jobs import Job

# Header room per hash computed during the run: a 64-digit hash may appear a few times in metadata
# (as a value, a key, with "0x" in front), so a header written before it is known keeps this much.
METADATA_ROOM_PER_HASH = 512

# metadata(input AutoV3s, output AutoV3) -> the output's metadata; unknown hashes are None.
MetadataFn = Callable[[list[str | None], str | None], Mapping[str, str]]


@dataclass(frozen=True)
class RunResult:
    output_autov3: str  # sha256 of the output's data section
    input_autov3: list[str]  # each input's, known or computed
    input_sha256: list[str | None] = field(default_factory=list)  # whole-file, when the run was asked for them


# ---------------------------------------------------------------------------------------------
# What a job's compute function gets


class _WorkerBuffers(threading.local):
    """Buffers one worker thread keeps from job to job, so that reading costs no freshly faulted pages.
    Most buffers need no keeping: while a run lasts, glibc recycles freed blocks up to the allocator's
    KEEP_MMAP_THRESHOLD (allocator.py), and maps larger ones afresh. That is cheap for the few large
    tensors read as stored, but jobs that convert whole tensors to fp32 double their size, and many
    of those land above the threshold: a worker keeps one fp32 buffer per source position for them,
    up to WHOLE_REUSE_BYTES (larger ones, the token embeddings, are allocated per job). It also keeps
    one fp32 block whose rows hold a chunk of each source (so one reduction can look at all of them)."""

    def __init__(self) -> None:
        self.fp32: list[torch.Tensor] = []
        self.rows = torch.empty(0, CHUNK_ELEMENTS, dtype=torch.float32)

    def whole_fp32(self, position: int, numel: int) -> torch.Tensor:
        """A flat fp32 tensor of `numel` elements, kept for `position` when its size is worth keeping."""
        nbytes = numel * 4
        if not KEEP_MMAP_THRESHOLD < nbytes <= WHOLE_REUSE_BYTES:
            return torch.empty(numel, dtype=torch.float32)
        while len(self.fp32) <= position:
            self.fp32.append(torch.empty(0, dtype=torch.float32))
        if self.fp32[position].numel() < numel:
            self.fp32[position] = torch.empty(numel, dtype=torch.float32)
        return self.fp32[position][:numel]

    def chunk_rows(self, n: int) -> torch.Tensor:
        if self.rows.shape[0] < n:
            self.rows = torch.empty(n, CHUNK_ELEMENTS, dtype=torch.float32)
        return self.rows[:n]


class SourceReader:
    """A job's access to one of its source tensors, through the worker's buffers. What it returns
    stays valid until the job returns."""

    def __init__(self, file: InputFile, info: TensorInfo, buffers: _WorkerBuffers, position: int):
        self.file = file
        self.info = info
        self.dtype = DTYPES[info.dtype]
        self._buffers = buffers
        self._position = position
        self._stored: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return self.info.numel

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    def stored(self) -> torch.Tensor:
        """The whole tensor, flat, in its stored dtype (read once per job)."""
        if self._stored is None:
            stored = torch.empty(self.numel, dtype=self.dtype)
            self._read(self.info.begin, stored)
            self._stored = stored
        return self._stored

    def elements(self, start: int, count: int) -> torch.Tensor:
        """Elements [start, start + count) of the flat tensor in the stored dtype: a slice of the
        whole tensor once `stored()` has read it, else read now into a new chunk-sized tensor."""
        if self._stored is not None:
            return self._stored[start:start + count]
        chunk = torch.empty(count, dtype=self.dtype)
        self._read(self.info.begin + start * self.dtype.itemsize, chunk)
        return chunk

    def fp32(self) -> torch.Tensor:
        """The whole tensor in fp32 and in its shape, converted chunk by chunk into the worker's buffer."""
        whole = self._buffers.whole_fp32(self._position, self.numel)
        for start in range(0, self.numel, CHUNK_ELEMENTS):
            self.fp32_into(start, whole[start:start + CHUNK_ELEMENTS])
        return whole.view(self.shape)

    def fp32_into(self, start: int, out: torch.Tensor) -> None:
        """Elements [start, start + len(out)) converted to fp32 into `out` (flat, contiguous); read
        straight into it when the tensor is stored as fp32."""
        if self.dtype == torch.float32 and self._stored is None:
            self._read(self.info.begin + start * 4, out)
        else:
            out.copy_(self.elements(start, out.numel()))

    def copy_to(self, out: torch.Tensor) -> None:
        """Copy the tensor's stored bytes into `out`, a contiguous tensor of the same dtype and shape
        (a tensor passed through unchanged)."""
        if out.dtype != self.dtype or tuple(out.shape) != self.shape or not out.is_contiguous():
            raise LineageError(f"cannot copy {self.info.name!r} ({self.info.dtype} {list(self.shape)}) into a "
                               f"{out.dtype} {list(out.shape)} tensor")
        self._read(self.info.begin, out)

    def _read(self, offset: int, into: torch.Tensor) -> None:
        if into.numel():
            self.file.read_into(offset, memoryview(into.reshape(-1).view(torch.uint8).numpy()))


class JobContext:
    """What a job's compute function gets: `sources` (a SourceReader per declared source, in order),
    `outputs` (a tensor per declared output, of its dtype and shape, to fill completely) and `device`,
    where the run computes (the readers and the outputs are on the host; see `to_device`)."""

    def __init__(self, sources: list[SourceReader], outputs: list[torch.Tensor], buffers: _WorkerBuffers,
                 device: torch.device):
        self.sources = sources
        self.outputs = outputs
        self.device = device
        self._buffers = buffers

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` on the run's device: itself on the CPU, else a copy (the host buffer may be reused
        as soon as this returns)."""
        return tensor.to(self.device)

    def fp32_chunks(self, readers: Sequence[SourceReader] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Walk tensors of equal size (the job's sources by default) in pieces of CHUNK_ELEMENTS,
        converted to fp32 into one reused block: yields (start, block), block[i] holding elements
        [start, start + block.shape[1]) of reader i. The block is overwritten by the next piece."""
        readers = self.sources if readers is None else readers
        numel = readers[0].numel
        if any(r.numel != numel for r in readers):
            raise LineageError("fp32_chunks needs tensors of one size, got "
                               + ", ".join(f"{r.info.name!r}: {r.numel}" for r in readers))
        rows = self._buffers.chunk_rows(len(readers))
        for start in range(0, numel, CHUNK_ELEMENTS):
            block = rows[:, :min(CHUNK_ELEMENTS, numel - start)]
            for row, reader in zip(block, readers):
                reader.fp32_into(start, row)
            yield start, block


# ---------------------------------------------------------------------------------------------
# Running


class _DataDigest:
    """In place of a writer when a run has no output file: the sha256 of the data only."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._digest.update(tensor_bytes(tensor))

    def data_sha256(self) -> str:
        return self._digest.hexdigest()


def _check_jobs(inputs: Sequence[InputFile], jobs: Sequence[Job]) -> None:
    """Every source exists, every output is a storable dtype and no output key is produced twice."""
    produced: set[str] = set()
    for job in jobs:
        for source in job.sources:
            if not 0 <= source.input < len(inputs):
                raise LineageError(f"a job reads input {source.input} of a run with {len(inputs)} inputs")
            inputs[source.input].info(source.key)
        for out in job.outputs:
            if out.dtype not in DTYPES:
                raise LineageError(f"output tensor {out.key!r} has unknown dtype {out.dtype!r}")
            if out.key in produced:
                raise LineageError(f"two jobs produce the output tensor {out.key!r}")
            produced.add(out.key)


def _offsets(job: Job) -> list[int]:
    """Where each of the job's outputs starts in its slot."""
    offsets, end = [], 0
    for out in job.outputs:
        offsets.append(end)
        end += -(-out.nbytes // SLOT_ALIGN) * SLOT_ALIGN
    return offsets


def _slot_bytes(job: Job) -> int:
    return _offsets(job)[-1] + job.outputs[-1].nbytes if job.outputs else 0


class _Run:
    """One execution: the state the worker threads share."""

    def __init__(self, inputs: Sequence[InputFile], jobs: Sequence[Job], device: torch.device):
        self.inputs = inputs
        self.jobs = jobs
        self.device = device
        self.buffers = _WorkerBuffers()

    def prefetch(self, job: Job) -> None:
        for source in job.sources:
            info = self.inputs[source.input].tensors[source.key]
            self.inputs[source.input].prefetch(info.begin, info.end)

    def execute(self, job: Job, slot: torch.Tensor) -> list[torch.Tensor]:
        """Run one job on a worker; returns its outputs (views into `slot`)."""
        for source in job.sources:
            self.inputs[source.input].check_unchanged()
        outputs = [slot[offset:offset + out.nbytes].view(DTYPES[out.dtype]).view(out.shape)
                   for out, offset in zip(job.outputs, _offsets(job))]
        readers = [SourceReader(self.inputs[s.input], self.inputs[s.input].tensors[s.key], self.buffers, position)
                   for position, s in enumerate(job.sources)]
        job.compute(JobContext(readers, outputs, self.buffers, self.device))
        return outputs


def run_jobs(inputs: Sequence[InputFile], jobs: Sequence[Job], output: str | os.PathLike | None, *,
             metadata: MetadataFn | None = None, known_autov3: Sequence[str | None] = (),
             expected_autov3: Sequence[str | None] = (), workers: int = 2, progress: bool = True,
             description: str = "run", device: torch.device | None = None,
             input_sha256: list[str | None] | None = None) -> RunResult:
    """Run `jobs` over `inputs` and write their outputs, in job order, to `output` (None: only hash them).

    `metadata(input_autov3s, output_autov3)` gives the output's metadata: it is called before the
    run with the hashes known then (None for the others) and once more at the end with all of them;
    the header keeps room for what the hashes add. `known_autov3[i]` spares hashing input i (e.g. the
    registry has seen the unchanged file); an input whose hash differs from `expected_autov3[i]`
    fails the run before the output appears, as does an input changed while the run reads it.
    `device` (from lineage.engine.device.compute_device; None: the CPU) is where the jobs compute.
    `input_sha256` (one entry per input, None where unknown) asks for the inputs' whole-file sha256
    too (A1111's identity): the run fills in the missing ones, in the same read that takes the AutoV3,
    before the final `metadata` call (which may read them from this list)."""
    _check_jobs(inputs, jobs)
    n = len(inputs)
    known = [known_autov3[i] if i < len(known_autov3) else None for i in range(n)]
    input_autov3: list[str | None] = list(known)
    run = _Run(inputs, jobs, device or torch.device("cpu"))
    slot_bytes = max((_slot_bytes(job) for job in jobs), default=0)
    free_slots = [torch.empty(slot_bytes, dtype=torch.uint8) for _ in range(OUTPUT_SLOTS_PER_WORKER * workers)]

    hash_error: list[BaseException] = []
    stop_hashing = threading.Event()

    wants_sha256 = [input_sha256 is not None and input_sha256[i] is None for i in range(n)]
    to_hash = sum(f.header.file_size - (0 if wants_sha256[i] else f.header.data_start)
                  for i, f in enumerate(inputs) if known[i] is None or wants_sha256[i])
    # The inputs' hashing has a bar of its own: it may still be reading after the last merged tensor is written.
    hash_bar = tqdm(total=to_hash, unit="B", unit_scale=True, desc="hashing inputs", leave=False, position=1,
                    disable=None if progress and to_hash else True)

    def hash_inputs() -> None:
        try:
            for i, f in enumerate(inputs):
                if input_autov3[i] is None or wants_sha256[i]:
                    whole_file = hashlib.sha256() if wants_sha256[i] else None
                    autov3 = f.data_autov3(stop_hashing, hash_bar.update, whole_file)
                    if autov3 is None:  # stopped
                        return
                    input_autov3[i] = autov3
                    if input_sha256 is not None and whole_file is not None:
                        input_sha256[i] = whole_file.hexdigest()
        except BaseException as e:  # re-raised by the calling thread
            hash_error.append(e)

    with ExitStack() as stack:
        stack.callback(hash_bar.close)
        if output is None:
            sink: SafetensorsWriter | _DataDigest = _DataDigest()
        else:
            plan = {out.key: (out.dtype, out.shape) for job in jobs for out in job.outputs}
            hashed_later = sum(known[i] is None or wants_sha256[i] for i in range(n))
            room = METADATA_ROOM_PER_HASH * (hashed_later + 1) if metadata else 0
            sink = stack.enter_context(SafetensorsWriter(output, plan, metadata(known, None) if metadata else None,
                                                         hash_data=True, metadata_room=room))
        hasher = threading.Thread(target=hash_inputs, name="lineage-hash-inputs", daemon=True)
        hasher.start()
        stack.callback(hasher.join)
        stack.callback(stop_hashing.set)  # on an error: stop hashing before the files are closed
        stack.callback(torch.set_num_threads, torch.get_num_threads())
        if gc.isenabled():
            gc.disable()
            stack.callback(gc.enable)
        stack.enter_context(keep_freed_memory())
        pool = stack.enter_context(ThreadPoolExecutor(workers, thread_name_prefix="lineage-worker",
                                                      initializer=torch.set_num_threads, initargs=(1,)))
        stack.callback(pool.shutdown, cancel_futures=True)
        bar = stack.enter_context(tqdm(total=sum(job.nbytes for job in jobs), unit="B", unit_scale=True,
                                       desc=description, disable=None if progress else True, leave=False))
        pending: deque[tuple[Job, Future[list[torch.Tensor]], torch.Tensor]] = deque()

        def finish_oldest() -> None:  # outputs go to the writer in file order
            job, future, slot = pending.popleft()
            for out, tensor in zip(job.outputs, future.result()):
                sink.write(out.key, tensor)
            free_slots.append(slot)
            bar.update(job.nbytes)

        for job in jobs:
            if not free_slots:
                finish_oldest()
            slot = free_slots.pop()
            run.prefetch(job)
            pending.append((job, pool.submit(run.execute, job, slot), slot))
        while pending:
            finish_oldest()
        hasher.join()  # on success the hasher runs to the end
        if hash_error:
            raise hash_error[0]
        for f in inputs:  # after the last read: what was read is what was there
            f.check_unchanged()
        hashes = [h for h in input_autov3 if h is not None]
        for i, (f, found) in enumerate(zip(inputs, hashes)):
            expected = expected_autov3[i] if i < len(expected_autov3) else None
            if expected and expected.lower() != found:
                raise LineageError(f"its content (AutoV3 {found[:12]}) is not the expected input "
                                   f"(AutoV3 {expected[:12]}); nothing was written", f.path)
        output_autov3 = sink.data_sha256()
        if isinstance(sink, SafetensorsWriter) and metadata:
            sink.update_metadata(metadata(list(hashes), output_autov3))
    return RunResult(output_autov3, hashes, list(input_sha256) if input_sha256 is not None else [None] * n)
