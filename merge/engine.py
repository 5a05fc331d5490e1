"""The streaming merge engine: plan a recipe over its inputs' headers, then run it tensor by tensor.

Planning reads only the inputs' headers. Every output key gets one step:
- `merge`: the recipe's method over the key's tensor from every input (its parameters resolved for
  that key: block weights, overrides);
- `copy`: the first model's tensor, cast to the output dtype (a block preset leaves the key unmerged,
  or the inputs disagree about the key and the recipe says to take it from the first model);
- `pass`: copied byte for byte from one input: `position_ids`, `logit_scale`, non-float tensors and
  the prediction-type markers (HANDBOOK §2: never interpolated);
- `marker`: an empty marker tensor for a prediction type no input carries.

Running overlaps reading, computing and writing:
- a pool of worker threads computes steps (pread, torch and pwrite release the GIL). Methods that
  declare themselves elementwise are run on chunks of `CHUNK_ELEMENTS` elements through buffers each
  worker reuses, so the working set stays in cache and no page is freshly faulted per tensor; a
  method with per-tensor statistics (TIES' thresholds) gets them first, computed from the inputs'
  whole tensors as mapped, and then runs on chunks the same way; other
  methods get whole fp32 tensors;
- each result lands in one of a few reused output slots; the calling thread takes the results in
  file order and hands them to the writer, which hashes them (the output's AutoV3) and streams
  them to disk in large direct-I/O blocks from its own thread (`lineage.direct_write`), and the
  slot is reused;
- another thread hashes the inputs' data sections (their AutoV3) unless the caller knows them.
Memory is bounded by the slots, the workers' chunk buffers and, for whole-tensor methods, the
tensors in flight — never by the checkpoint size. The output is written to a temporary file that is
renamed into place only when complete (SafetensorsWriter), so a failure or a kill leaves the
destination untouched.
"""
from __future__ import annotations

import gc
import hashlib
import math
import mmap
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from lineage.io import direct_write
from lineage.engine.allocator import keep_freed_memory
from lineage.sdxl.detection import require_sdxl
from lineage.errors import LineageError
from lineage.io.safetensors import DTYPES, SafetensorsFile, SafetensorsWriter, TensorInfo, dtype_size
from lineage.lazy import torch
from lineage.engine.seeding import key_seed
from lineage.sdxl.layout import MARKER_KEYS, MARKERS_FOR_PREDICTION, is_pass_through

from .methods import SLICE_ELEMENTS, MergeMethod
from .recipe import Recipe

CHUNK_ELEMENTS = SLICE_ELEMENTS  # 1 MiB of fp32 per input: stays in cache, large enough that per-op costs are small
RELEASE_BEHIND_BYTES = 2 << 20  # the largest page-cache folio a fault maps (a PMD)
RELEASE_EVERY_BYTES = 8 << 20  # input bytes read between two releases of their pages
WHOLE_REUSE_ELEMENTS = 1 << 24  # whole-tensor methods reuse per-worker fp32 buffers up to 64 MiB per input
HASH_CHUNK_BYTES = 16 << 20
OUTPUT_SLOTS_PER_WORKER = 4  # steps in flight per worker: a worker that finishes early takes more while a long step runs


def placeholder_autov3(i: int) -> str:
    """A stand-in hash of the final length (distinct per input), reserving the header space the real
    hashes take once known."""
    return format(i, "064x")


def is_elementwise(method: MergeMethod) -> bool:
    """Whether the method may be run on pieces of a tensor: it declares itself elementwise (given its
    statistics, if it has any) and needs no per-tensor random stream."""
    return method.elementwise and not method.random


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Step:
    """What the engine does for one output key."""

    key: str
    action: str  # merge | copy | pass | marker
    dtype: str  # output safetensors dtype
    shape: tuple[int, ...]
    source: int = 0  # input index a copy / pass-through comes from
    params: Mapping[str, Any] | None = None  # the method's parameters for this key (merge only)
    reason: str = ""  # why a key is copied rather than merged

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.dtype)


@dataclass
class MergePlan:
    """The steps of a merge, decided from the inputs' headers alone (what `--dry-run` shows)."""

    recipe: Recipe
    steps: list[Step]
    input_prediction_types: list[str]
    prediction_type: str
    dropped: list[str] = field(default_factory=list)  # keys left out (mismatch policy "drop"/"first")
    workers: int = 2

    @property
    def output_plan(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {s.key: (s.dtype, s.shape) for s in self.steps}

    @property
    def output_bytes(self) -> int:
        return sum(s.nbytes for s in self.steps)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.steps:
            label = self.recipe.method if s.action == "merge" else s.action + (f" ({s.reason})" if s.reason else "")
            out[label] = out.get(label, 0) + 1
        if self.dropped:
            out["dropped"] = len(self.dropped)
        return out

    def memory_estimate(self) -> int:
        """Bytes of buffers the run holds at its peak (excluding the interpreter and torch themselves)."""
        n = len(self.recipe.inputs)
        slots = OUTPUT_SLOTS_PER_WORKER * self.workers
        largest_outputs = sorted((s.nbytes for s in self.steps), reverse=True)[:slots]
        merged = [s for s in self.steps if s.action == "merge"]
        if is_elementwise(self.recipe.merge_method):
            working = self.workers * CHUNK_ELEMENTS * (n * (8 + 4) + 4)
        else:  # whole fp32 tensors: the inputs as stored and in fp32, the result, ~2 temporaries
            numels = sorted((s.nbytes // dtype_size(s.dtype) for s in merged), reverse=True)[: self.workers]
            working = sum(numel * (n * (2 + 4) + 3 * 4) for numel in numels)
        return sum(largest_outputs) + working + direct_write.BLOCKS * direct_write.BLOCK_BYTES

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.recipe.method,
            "inputs": [i.path for i in self.recipe.inputs],
            "prediction_type": self.prediction_type,
            "keys": len(self.steps),
            "steps": self.counts(),
            "dropped": self.dropped,
            "output_dtype": self.recipe.dtype,
            "output_bytes": self.output_bytes,
            "memory_estimate_bytes": self.memory_estimate(),
        }

    def describe(self) -> str:
        lines = [f"merge {self.recipe.method} of {len(self.recipe.inputs)} models -> {len(self.steps)} tensors "
                 f"({self.output_bytes / 1e9:.2f} GB, merged tensors as {self.recipe.dtype})",
                 f"  prediction type: {self.prediction_type}"]
        for label, n in self.counts().items():
            lines.append(f"  {n:>5}  {label}")
        if self.dropped:
            shown = ", ".join(self.dropped[:3]) + (", …" if len(self.dropped) > 3 else "")
            lines.append(f"  dropped: {shown}")
        lines.append(f"  memory estimate: {self.memory_estimate() / 2**20:.0f} MiB of buffers "
                     f"({self.workers} workers) beyond the interpreter")
        return "\n".join(lines)


def _listing(keys: Sequence[str], most: int = 5) -> str:
    shown = ", ".join(keys[:most])
    return shown + (f", … ({len(keys)} in all)" if len(keys) > most else "")


def _choose_prediction_type(recipe: Recipe, types: list[str]) -> str:
    if recipe.prediction_type:
        if recipe.prediction_type not in types and recipe.prediction_type not in MARKERS_FOR_PREDICTION:
            raise LineageError(f"prediction type {recipe.prediction_type!r} is neither an input's nor one of "
                               f"{', '.join(MARKERS_FOR_PREDICTION)}")
        return recipe.prediction_type
    if len(set(types)) > 1:
        found = "; ".join(f"{i.path}: {t}" for i, t in zip(recipe.inputs, types))
        raise LineageError(f"the inputs have different prediction types ({found}); say which to keep "
                           f"(recipe `prediction_type`, `lmerge merge --prediction-type`)")
    return types[0]


def plan_merge(recipe: Recipe, files: Sequence[SafetensorsFile], workers: int = 2) -> MergePlan:
    """Decide every output key's step from the open inputs' headers."""
    types = [require_sdxl(f.path).prediction_type or "epsilon" for f in files]
    prediction = _choose_prediction_type(recipe, types)
    out_dtype = recipe.storage_dtype

    keys: dict[str, None] = {}  # union of the inputs' keys, in the first model's order first
    for f in files:
        keys.update((k, None) for k in f.tensors if k not in MARKER_KEYS)
    mismatched: list[str] = []
    steps: list[Step] = []
    dropped: list[str] = []
    for key in keys:
        infos = [f.tensors.get(key) for f in files]
        first = infos[0]
        if any(i is None for i in infos) or len({i.shape for i in infos if i is not None}) > 1:
            mismatched.append(key)
            if recipe.mismatch == "first" and first is not None:
                steps.append(_copy_step(first, out_dtype, "taken from the first model: inputs disagree"))
            else:
                dropped.append(key)
            continue
        assert first is not None
        if is_pass_through(key) or not first.is_float:
            steps.append(Step(key, "pass", first.dtype, first.shape, reason="pass-through"))
            continue
        params = recipe.params_for(key)
        if params is None:
            steps.append(_copy_step(first, out_dtype, "not merged by the block preset"))
        else:
            steps.append(Step(key, "merge", out_dtype, first.shape, params=params))
    if mismatched and recipe.mismatch == "error":
        details = []
        for idx, f in enumerate(files):
            missing = [k for k in mismatched if k not in f.tensors]
            if missing:
                details.append(f"{f.path} lacks {len(missing)}: {_listing(missing)}")
        shapes = [k for k in mismatched if all(k in f.tensors for f in files)]
        if shapes:
            details.append("shapes disagree for " + "; ".join(
                f"{k} ({' vs '.join(str(list(f.tensors[k].shape)) for f in files)})" for k in shapes[:5])
                + (f" … ({len(shapes)} in all)" if len(shapes) > 5 else ""))
        raise LineageError("the inputs do not have the same tensors: " + "; ".join(details)
                           + ". Use mismatch 'first' (take them from the first model) or 'drop'.")

    steps.extend(_marker_steps(files, types, prediction))
    return MergePlan(recipe, steps, types, prediction, dropped, workers)


def _copy_step(info: TensorInfo, out_dtype: str, reason: str) -> Step:
    dtype = out_dtype if info.is_float else info.dtype
    return Step(info.name, "copy", dtype, info.shape, reason=reason)


def _marker_steps(files: Sequence[SafetensorsFile], types: list[str], prediction: str) -> list[Step]:
    """The chosen prediction type's markers: copied from the first input of that type, else written empty."""
    for idx, (f, t) in enumerate(zip(files, types)):
        if t == prediction:
            return [Step(k, "pass", f.tensors[k].dtype, f.tensors[k].shape, source=idx, reason="prediction marker")
                    for k in f.tensors if k in MARKER_KEYS]
    return [Step(k, "marker", "F32", (0,), reason="prediction marker") for k in MARKERS_FOR_PREDICTION[prediction]]


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class RunResult:
    output_autov3: str
    input_autov3: list[str]
    nonfinite: list[tuple[str, str]]  # (input path, key) of input tensors holding NaN or Inf


class _MappedInput:
    """One input mapped into memory: tensors are read straight from the page cache (no copy into
    our own buffers), and the pages a worker is done with are dropped from the process's resident
    set (MADV_DONTNEED), so RSS stays at the pieces in flight rather than the whole file."""

    def __init__(self, f: SafetensorsFile):
        with open(f.path, "rb") as fh:
            # A private (copy-on-write) mapping is writable for torch.frombuffer; nothing writes to it.
            self.map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        self.tensors = f.tensors

    def elements(self, key: str, start: int, count: int) -> torch.Tensor:
        """Elements [start, start+count) of a tensor, flat, in its stored dtype (a view on the mapping)."""
        dtype = self.tensors[key].torch_dtype
        return torch.frombuffer(self.map, dtype=dtype, count=count, offset=self.tensors[key].begin + start * dtype.itemsize)

    def prefetch(self, key: str) -> None:
        """Ask the kernel to start reading the tensor now (asynchronously), so a worker reaching it
        finds its pages in the page cache instead of faulting them in from disk 128 KiB at a time."""
        info = self.tensors[key]
        begin = info.begin // mmap.PAGESIZE * mmap.PAGESIZE
        if info.end > begin:
            self.map.madvise(mmap.MADV_WILLNEED, begin, info.end - begin)

    def release(self, key: str, start: int, count: int) -> None:
        """Drop the pages of those elements from the resident set (they stay in the page cache).
        A fault maps the whole page-cache folio around the address, which may reach back into pages
        released before, so the range starts RELEASE_BEHIND_BYTES earlier."""
        info = self.tensors[key]
        size = info.torch_dtype.itemsize
        begin = max(0, info.begin + start * size - RELEASE_BEHIND_BYTES) // mmap.PAGESIZE * mmap.PAGESIZE
        end = info.begin + (start + count) * size
        if end > begin:
            self.map.madvise(mmap.MADV_DONTNEED, begin, end - begin)


class _Scratch(threading.local):
    """Per-worker fp32 buffers, reused for every tensor: chunk buffers for elementwise methods, and
    whole-tensor buffers (up to WHOLE_REUSE_ELEMENTS) for the others, so inputs cost no fresh pages."""

    def __init__(self) -> None:
        self.chunk_rows = torch.empty(0, CHUNK_ELEMENTS, dtype=torch.float32)
        self.wholes: list[torch.Tensor] = []

    def chunks(self, n: int) -> torch.Tensor:
        """n chunk buffers as the rows of one tensor (so one reduction can check them all)."""
        if self.chunk_rows.shape[0] < n:
            self.chunk_rows = torch.empty(n, CHUNK_ELEMENTS, dtype=torch.float32)
        return self.chunk_rows[:n]

    def whole(self, i: int, numel: int) -> torch.Tensor:
        if numel > WHOLE_REUSE_ELEMENTS:  # the few huge tensors (token embeddings) get their own
            return torch.empty(numel, dtype=torch.float32)
        while len(self.wholes) <= i:
            self.wholes.append(torch.empty(0, dtype=torch.float32))
        if self.wholes[i].numel() < numel:
            self.wholes[i] = torch.empty(numel, dtype=torch.float32)
        return self.wholes[i][:numel]


def _all_finite(x: torch.Tensor) -> bool:
    # One reduction instead of a full boolean mask: the sum of finite values is finite (fp16/bf16
    # inputs cannot overflow fp32), and when it is not, the exact test settles an fp32 overflow.
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


class _Run:
    """One execution of a plan; the state its threads share."""

    def __init__(self, plan: MergePlan, files: Sequence[SafetensorsFile], fail_on_nonfinite: bool):
        self.plan = plan
        self.files = files
        self.mapped = [_MappedInput(f) for f in files]
        self.method = plan.recipe.merge_method
        self.elementwise = is_elementwise(self.method)
        self.fail_on_nonfinite = fail_on_nonfinite
        self.nonfinite: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.scratch = _Scratch()

    def prefetch(self, step: Step) -> None:
        """Start reading the inputs' tensors a step will need (see _MappedInput.prefetch)."""
        if step.action == "merge":
            for m in self.mapped:
                m.prefetch(step.key)
        elif step.action == "copy":
            self.mapped[step.source].prefetch(step.key)

    def _note_nonfinite(self, idx: int, key: str) -> None:
        path = self.files[idx].path
        if self.fail_on_nonfinite:
            raise LineageError(f"tensor {key!r} holds NaN or Inf", path)
        with self.lock:
            if (path, key) not in self.nonfinite:
                self.nonfinite.append((path, key))

    def _fp32(self, idx: int, key: str, start: int, count: int, buffer: torch.Tensor, check: bool) -> torch.Tensor:
        """Elements of input idx's tensor converted into `buffer` (fp32), checked for NaN/Inf if asked."""
        x = buffer[:count]
        x.copy_(self.mapped[idx].elements(key, start, count))
        self.mapped[idx].release(key, start, count)
        if check and not _all_finite(x):
            self._note_nonfinite(idx, key)
        return x

    def compute(self, step: Step, slot: torch.Tensor) -> torch.Tensor:
        """Fill the start of `slot` with the step's output bytes; returns that view in the output dtype."""
        out = slot[: step.nbytes].view(DTYPES[step.dtype]).reshape(step.shape)
        if step.action == "marker":
            return out
        if step.action == "merge":
            self._merge(step, out.reshape(-1))
            return out
        info = self.files[step.source].tensors[step.key]
        if info.dtype == step.dtype:  # pass-through, or a copy already in the output dtype
            self.files[step.source].read_into(info, slot)
        else:
            self._chunked(step, out.reshape(-1), [step.source], lambda x: x)
        return out

    def _merge(self, step: Step, out: torch.Tensor) -> None:
        params = dict(step.params or {})
        if self.method.random:
            params["seed"] = key_seed(self.plan.recipe.seed, step.key)
        inputs = range(len(self.files))
        if self.elementwise:
            if self.method.statistics is not None:
                numel = out.numel()
                params["statistics"] = self.method.statistics(
                    [m.elements(step.key, 0, numel) for m in self.mapped], params)
            self._chunked(step, out, inputs, lambda *xs: self.method.fn(*xs, **params))
            return
        numel = out.numel()
        xs = [self._fp32(i, step.key, 0, numel, self.scratch.whole(i, numel), check=True).view(step.shape)
              for i in inputs]
        out.copy_(self.method.fn(*xs, **params).reshape(-1))

    def _chunked(self, step: Step, out: torch.Tensor, inputs: Sequence[int], fn: Callable[..., torch.Tensor]) -> None:
        """Run `fn` over CHUNK_ELEMENTS-sized pieces of the inputs' tensors, through reused fp32
        buffers. Merged inputs are checked for NaN/Inf with one reduction per piece over all of
        them; their pages are dropped from the resident set every RELEASE_EVERY_BYTES (a madvise
        per piece cost more than the check)."""
        check = step.action == "merge"
        numel = out.numel()
        rows = self.scratch.chunks(len(inputs))
        itemsize = max(self.files[idx].tensors[step.key].torch_dtype.itemsize for idx in inputs)
        released = 0
        for start in range(0, numel, CHUNK_ELEMENTS):
            count = min(CHUNK_ELEMENTS, numel - start)
            xs = [row[:count] for row in rows]
            for x, idx in zip(xs, inputs):
                x.copy_(self.mapped[idx].elements(step.key, start, count))
            if check and not _all_finite(rows[:, :count]):
                for x, idx in zip(xs, inputs):
                    if not _all_finite(x):
                        self._note_nonfinite(idx, step.key)
            out[start:start + count].copy_(fn(*xs))
            end = start + count
            if (end - released) * itemsize >= RELEASE_EVERY_BYTES or end == numel:
                for idx in inputs:
                    self.mapped[idx].release(step.key, released, end - released)
                released = end


def data_section_autov3(f: SafetensorsFile, stop: threading.Event | None = None) -> str | None:
    """AutoV3 of an open file: sha256 of its data section, read sequentially through one buffer.
    Returns None when `stop` is set before the end."""
    digest = hashlib.sha256()
    buffer = torch.empty(HASH_CHUNK_BYTES, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    for begin in range(f.data_start, f.file_size, HASH_CHUNK_BYTES):
        if stop is not None and stop.is_set():
            return None
        end = min(begin + HASH_CHUNK_BYTES, f.file_size)
        f.read_into(TensorInfo("<data section>", "U8", (end - begin,), begin, end), buffer)
        digest.update(view[: end - begin])
    return digest.hexdigest()


def run_plan(plan: MergePlan, files: Sequence[SafetensorsFile], output: str,
             metadata: Callable[[list[str], str], dict[str, str]], *,
             known_autov3: Sequence[str | None] = (), fail_on_nonfinite: bool = False,
             progress: bool = True) -> RunResult:
    """Write the plan's output to `output`. `metadata(input_autov3s, output_autov3)` builds the header
    metadata; it is called first with placeholders (to size the header) and again with the real hashes.
    `known_autov3[i]` skips hashing input i (e.g. the registry has seen the unchanged file). Inputs
    whose hash differs from the one the recipe names fail the run before the output is renamed."""
    run = _Run(plan, files, fail_on_nonfinite)
    n = len(files)
    input_autov3: list[str | None] = [known_autov3[i] if i < len(known_autov3) else None for i in range(n)]
    slot_count = OUTPUT_SLOTS_PER_WORKER * plan.workers
    slot_bytes = max((s.nbytes for s in plan.steps), default=0)
    free_slots = [torch.empty(slot_bytes, dtype=torch.uint8) for _ in range(slot_count)]  # pages touched lazily

    hash_error: list[BaseException] = []
    stop_hashing = threading.Event()

    def hash_inputs() -> None:
        try:
            for i, f in enumerate(files):
                if input_autov3[i] is None:
                    input_autov3[i] = data_section_autov3(f, stop_hashing)
        except BaseException as e:  # re-raised by the caller
            hash_error.append(e)

    placeholders = [placeholder_autov3(i) for i in range(n)]
    with ExitStack() as stack:
        writer = stack.enter_context(SafetensorsWriter(output, plan.output_plan, metadata(placeholders, placeholder_autov3(n)),
                                                       hash_data=True))
        hasher = threading.Thread(target=hash_inputs, name="lineage-hash-inputs", daemon=True)
        hasher.start()
        stack.callback(hasher.join)
        stack.callback(stop_hashing.set)  # on an error: stop hashing before the files are closed
        # Parallelism comes from the workers; torch's own threads inside each would fight them for
        # the cores (and spin while waiting). Restore the caller's setting afterwards.
        stack.callback(torch.set_num_threads, torch.get_num_threads())
        # The run allocates a few small objects per chunk and frees them at once; the cycle collector's
        # passes over the whole heap that this triggers are pure cost here.
        if gc.isenabled():
            gc.disable()
            stack.callback(gc.enable)
        stack.enter_context(keep_freed_memory())  # the chunks' temporaries reuse memory instead of faulting anew
        pool = stack.enter_context(ThreadPoolExecutor(plan.workers, thread_name_prefix="lineage-merge",
                                                      initializer=torch.set_num_threads, initargs=(1,)))
        stack.callback(pool.shutdown, cancel_futures=True)
        bar = stack.enter_context(tqdm(total=plan.output_bytes, unit="B", unit_scale=True, desc="merge",
                                       disable=None if progress else True, leave=False))
        pending: deque[tuple[Step, Future[torch.Tensor], torch.Tensor]] = deque()

        def finish_oldest() -> None:  # the writer takes the tensors in file order
            step, future, slot = pending.popleft()
            writer.write(step.key, future.result())
            free_slots.append(slot)
            bar.update(step.nbytes)

        for step in plan.steps:
            if not free_slots:
                finish_oldest()
            slot = free_slots.pop()
            run.prefetch(step)
            pending.append((step, pool.submit(run.compute, step, slot), slot))
        while pending:
            finish_oldest()
        hasher.join()  # on success the hasher runs to the end
        if hash_error:
            raise hash_error[0]
        hashes = [h for h in input_autov3 if h is not None]
        for f, inp, found in zip(files, plan.recipe.inputs, hashes):
            if inp.autov3 and inp.autov3.lower() != found:
                raise LineageError(f"its content (AutoV3 {found[:12]}) is not the recipe's input "
                                   f"(AutoV3 {inp.autov3[:12]}); nothing was written", f.path)
        output_autov3 = writer.data_sha256()
        writer.update_metadata(metadata(hashes, output_autov3))
    return RunResult(output_autov3, hashes, run.nonfinite)
