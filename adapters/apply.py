"""`lineage.adapters.apply(...)`: bake adapters into a checkpoint, as a planner on the one executor
(lineage/engine/executor.py) — docs/adapters.md, "Applying adapters".

    import lineage.adapters
    lineage.adapters.apply("base.safetensors", ["style.safetensors", ("detail.safetensors", 0.5)],
                           "styled.safetensors")

Every adapter (LoRA, LoCon, LoKr, LoHa, full diff, with or without DoRA) is opened through the reader,
which checks that each of its modules fits the checkpoint. Each checkpoint key some module adapts
becomes one job that reads the key and every adapter's tensors for it, converts the weight to fp32,
adds each module's delta at its strength in turn (adapters/delta.py; OpenCLIP-G's q, k and v patch
their thirds of one `in_proj_weight`), and stores the result in the key's own dtype. Every other key,
the prediction-type markers and pass-through tensors included, is copied byte for byte. The output
appears only once complete, never on an input, and is recorded as a `merge` of the checkpoint (weight
1) and each adapter (weight: its strength).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lineage.engine.finite import all_finite
from lineage.engine.jobs import Job, Output, Source
from lineage.errors import CheckpointError, LineageError
from lineage.graph.metadata import LINEAGE_RECORD_KEY, modelspec_metadata
from lineage.io.atomic import file_destination
from lineage.io.safetensors import TensorInfo
from lineage.merge.records import SDXL_ARCHITECTURE, SDXL_IMPLEMENTATION, SDXL_RESOLUTION
from lineage.sdxl.detection import require_sdxl
from lineage.sdxl.layout import is_pass_through

from .metadata import adapter_record
from .modules import modules_by_name
from .reader import AdapterFile, AdapterModule, open_adapter

if TYPE_CHECKING:
    from lineage.engine.executor import JobContext

DEFAULT_WORKERS = min(4, os.cpu_count() or 2)
# Roles whose tensors a job reads (alpha is read once, by the reader).
FACTOR_ROLES_SKIPPED = frozenset({"alpha"})


@dataclass(frozen=True)
class AdapterInput:
    """An adapter file and the strength it is applied at."""

    path: str
    strength: float = 1.0

    @classmethod
    def parse(cls, text: str) -> AdapterInput:
        """`PATH` or `PATH:STRENGTH` (the last colon splits, when what follows is a number). What follows
        a colon and is neither a number nor part of a path (`C:/x.safetensors`, an existing file's
        name) is a strength that is not a number: an error."""
        path, sep, tail = text.rpartition(":")
        if not sep:
            return cls(text)
        try:
            strength = float(tail)
        except ValueError:
            if "/" in tail or "\\" in tail or os.path.exists(text):
                return cls(text)
            raise LineageError(f"{text!r}: the strength {tail!r} after the colon is not a number") from None
        if not math.isfinite(strength):
            raise LineageError(f"{text!r}: the strength must be a finite number, got {tail!r}")
        return cls(path, strength)


@dataclass(frozen=True)
class Patch:
    """One adapter module on one checkpoint key: `rows` is the slice of the key it adapts (OpenCLIP-G's
    q/k/v), `shape` the adapted weight's shape, `bias` whether it is the module's `diff_b` on the bias."""

    adapter: int  # index into the plan's adapters
    module: AdapterModule
    rows: tuple[int, int] | None
    shape: tuple[int, ...]
    strength: float
    bias: bool = False

    @property
    def roles(self) -> list[str]:
        """The roles this patch reads, in a fixed order."""
        wanted = ("diff_b",) if self.bias else tuple(r for r in self.module.keys if r not in FACTOR_ROLES_SKIPPED
                                                     and r != "diff_b")
        return [r for r in wanted if r in self.module.keys]


@dataclass
class ApplyPlan:
    """What an apply does, decided from the headers alone: the checkpoint's keys in file order, and the
    patches on each adapted key."""

    checkpoint: str
    adapters: list[AdapterInput]
    files: list[AdapterFile]
    tensors: dict[str, TensorInfo]
    patches: dict[str, list[Patch]] = field(default_factory=dict)
    prediction_type: str | None = None

    def summary(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "adapters": [{"path": a.path, "strength": a.strength,
                                                             "modules": len(f.modules), "algorithm": f.algorithm}
                                                            for a, f in zip(self.adapters, self.files)],
                "keys": len(self.tensors), "patched_keys": len(self.patches)}


def _bias_key(key: str) -> str:
    """The bias beside a weight key: `….weight` -> `….bias`, OpenCLIP's `in_proj_weight` -> `in_proj_bias`."""
    return key[:-len("weight")] + "bias"


def plan_apply(checkpoint: str, tensors: Mapping[str, TensorInfo], adapters: Sequence[AdapterInput],
               prediction_type: str | None = None) -> ApplyPlan:
    """Open every adapter against the checkpoint's header and place each module's patch on its key."""
    targets = modules_by_name(tensors)
    files = [open_adapter(a.path, base=tensors) for a in adapters]
    plan = ApplyPlan(checkpoint, list(adapters), files, dict(tensors), prediction_type=prediction_type)
    for index, (adapter, file) in enumerate(zip(adapters, files)):
        for name, module in file.modules.items():
            target = targets[name]
            if module.alpha is not None and not math.isfinite(module.alpha):
                raise CheckpointError(f"module {name} has alpha {module.alpha}", adapter.path)
            if is_pass_through(target.key):
                raise LineageError(f"module {name} would change {target.key}, which is never patched", adapter.path)
            if any(r != "diff_b" and r not in FACTOR_ROLES_SKIPPED for r in module.keys):
                plan.patches.setdefault(target.key, []).append(
                    Patch(index, module, target.rows, target.shape, adapter.strength))
            if "diff_b" in module.keys:
                bias = _bias_key(target.key)
                info = tensors.get(bias)
                rows = (0, target.shape[0]) if target.rows is None else target.rows
                if info is None or info.shape[0] < rows[1] or module.shapes["diff_b"] != (rows[1] - rows[0],):
                    raise CheckpointError(f"module {name}: diff_b {list(module.shapes['diff_b'])} does not fit the "
                                          f"checkpoint's {bias if info else 'bias (it has none)'}", adapter.path)
                plan.patches.setdefault(bias, []).append(
                    Patch(index, module, target.rows, (rows[1] - rows[0],), adapter.strength, bias=True))
    return plan


class ApplyJobs:
    """The executor's jobs for an ApplyPlan: one per checkpoint key, in file order."""

    def __init__(self, plan: ApplyPlan):
        self.plan = plan

    def jobs(self) -> list[Job]:
        jobs = []
        for key, info in self.plan.tensors.items():
            output = (Output(key, info.dtype, tuple(info.shape)),)
            patches = self.plan.patches.get(key)
            if not patches:
                jobs.append(Job((Source(0, key),), output, _copy))
                continue
            sources = (Source(0, key), *patch_sources(patches, first_input=1))
            jobs.append(Job(sources, output, partial(patch_key, patches, [a.path for a in self.plan.adapters])))
        return jobs


def patch_sources(patches: Sequence[Patch], first_input: int) -> list[Source]:
    """The adapter tensors `patches` read, in the order `add_patches_` takes them: adapter i is the
    run's input `first_input + i` (1 in an apply, after the checkpoint; after the models in a merge)."""
    return [Source(first_input + p.adapter, p.module.keys[role]) for p in patches for role in p.roles]


def patch_key(patches: Sequence[Patch], adapter_paths: Sequence[str], ctx: JobContext) -> None:
    """The job of a key that adapters patch and nothing else changes: its tensor (the job's first source) in
    fp32 on the run's device, the patches added (their factors: the other sources, `patch_sources`), then
    stored in the key's dtype (the job's output). `lmerge apply` and the keys a merge copies use it."""
    tensors = patch_tensors(patches, ((r.info.name, r.fp32()) for r in ctx.sources[1:]), adapter_paths,
                            ctx.device)
    _patch_weight(_JobWeight(ctx), patches, tensors)


def add_patches_(weight: Any, patches: Sequence[Patch], factors: Iterable[tuple[str, Any]],
                 adapter_paths: Sequence[str]) -> None:
    """Add every patch of one key to its fp32 `weight` (in place, on the weight's device), in order. `factors`
    yields (tensor name, tensor) for each patch's roles in turn (a job's readers of `patch_sources`, or an
    adapter file read directly); each is taken in fp32 on the weight's device. A factor holding NaN or Inf
    fails with the adapter (`adapter_paths[patch.adapter]`) named."""
    tensors = patch_tensors(patches, factors, adapter_paths, weight.device)
    _patch_weight(_WeightInMemory(weight), patches, tensors)


def patch_tensors(patches: Sequence[Patch], factors: Iterable[tuple[str, Any]], adapter_paths: Sequence[str],
                  device: Any) -> list[dict[str, Any]]:
    """Each patch's factors by role, fp32 on `device`, from `factors` ((tensor name, tensor) for each
    patch's roles in turn); a factor holding NaN or Inf fails with its adapter named."""
    import torch

    found = iter(factors)
    tensors = []
    for patch in patches:
        by_role = {}
        for role in patch.roles:
            name, value = next(found)
            if not all_finite(value):
                raise CheckpointError(f"tensor {name!r} holds NaN or Inf", adapter_paths[patch.adapter])
            by_role[role] = value.to(device, torch.float32)
        tensors.append(by_role)
    return tensors


class WeightRows(Protocol):
    """Where the fp32 rows of a key that patches change come from and go to (`_patch_weight`): a job's
    reader and output (`_JobWeight`), or a weight in memory (`_WeightInMemory`)."""

    device: Any
    shape: tuple[int, int]  # the weight as a matrix: (rows, columns · kh · kw)

    def whole(self) -> Any:
        """The whole weight in fp32, in its own shape, on `device`."""

    def store_whole(self, weight: Any) -> None:
        """Keep `whole()`, patched."""

    def rows(self, start: int, stop: int) -> Any:
        """The matrix's rows [start, stop) in fp32 (on the CPU)."""

    def store_rows(self, start: int, rows: Any) -> None:
        """Keep `rows(start, …)`, patched."""


class _JobWeight:
    """The rows of a job's key: read from its first source (converted to fp32), stored into its output
    (the key's dtype). A block of rows is read into one reused fp32 buffer."""

    def __init__(self, ctx: JobContext):
        self.ctx, self.source, self.output = ctx, ctx.sources[0], ctx.outputs[0]
        self.device = ctx.device
        self.stored = self.output.view(self.output.shape[0], -1)
        self.shape = tuple(self.stored.shape)
        self._block: Any = None

    def whole(self) -> Any:
        return self.ctx.to_device(self.source.fp32())

    def store_whole(self, weight: Any) -> None:
        self.output.copy_(weight)

    def rows(self, start: int, stop: int) -> Any:
        import torch

        columns = self.shape[1]
        if self._block is None:
            self._block = torch.empty(max(BLOCK_ELEMENTS, columns))
        rows = self._block[:(stop - start) * columns].view(stop - start, columns)
        self.source.fp32_into(start * columns, rows.view(-1))
        return rows

    def store_rows(self, start: int, rows: Any) -> None:
        self.stored[start:start + rows.shape[0]].copy_(rows)


class _WeightInMemory:
    """The rows of an fp32 weight in memory, patched in place: nothing to read or store."""

    def __init__(self, weight: Any):
        self.weight, self.device = weight, weight.device
        self.matrix = weight.view(weight.shape[0], -1)
        self.shape = tuple(self.matrix.shape)

    def whole(self) -> Any:
        return self.weight

    def store_whole(self, weight: Any) -> None:
        pass  # `whole` is the weight itself

    def rows(self, start: int, stop: int) -> Any:
        return self.matrix[start:stop]

    def store_rows(self, start: int, rows: Any) -> None:
        pass  # `rows` is a view of the weight


def _patch_weight(weight: WeightRows, patches: Sequence[Patch],
                  tensors: Sequence[dict[str, Any]]) -> None:
    """Add `patches` (their factors by role: `tensors`) to `weight`, wherever its rows come from and go to.
    Each patch's delta is rebuilt once (adapters/delta.py). On the CPU, when every delta is a product or a
    dense matrix (`rows_apart`), the weight goes through a block of rows at a time (`row_blocks`): read,
    patched and stored while the block is still in the CPU's cache, instead of three passes over a whole
    fp32 copy in memory; each block gets the sums the whole weight would, to fp32 rounding."""
    deltas = patch_deltas(patches, tensors)
    if weight.device.type == "cpu" and rows_apart(patches, tensors, deltas):
        for start, stop in row_blocks(weight.shape):
            rows = weight.rows(start, stop)
            add_rows_(rows, start, patches, deltas)
            weight.store_rows(start, rows)
        return
    whole = weight.whole()
    for patch, delta, found in zip(patches, deltas, tensors):
        add_patch_(whole, patch, delta, found)
    weight.store_whole(whole)


def patch_deltas(patches: Sequence[Patch], tensors: Sequence[dict[str, Any]]) -> list[Any]:
    """Each patch's delta (adapters/delta.py), checked against the weight it patches; None for a bias."""
    from .delta import rebuild, require_fits

    deltas = []
    for patch, found in zip(patches, tensors):
        delta = None
        if not patch.bias:
            delta = rebuild(patch.module.algorithm, found, patch.module.alpha)
            require_fits(delta, patch.module.algorithm, patch.shape)
        deltas.append(delta)
    return deltas


def rows_apart(patches: Sequence[Patch], tensors: Sequence[dict[str, Any]], deltas: Sequence[Any]) -> bool:
    """Whether every patch can be added a block of rows at a time: products and dense matrices on a
    weight, no DoRA (its norms need every row)."""
    from .delta import SLICEABLE

    return not any(p.bias or "dora_scale" in t or d.kind not in SLICEABLE for p, t, d in zip(patches, tensors, deltas))


def add_patch_(weight: Any, patch: Patch, delta: Any, tensors: dict[str, Any]) -> None:
    """Add one patch to the fp32 `weight` (in place): its rebuilt `delta` to its rows of a fused weight
    (OpenCLIP-G's q/k/v) with DoRA's `dora_scale` when `tensors` (its factors by role) hold one, or its
    `diff_b` to the bias (`delta` None)."""
    from .delta import add_delta_  # imports torch: not at module import

    rows = slice(*patch.rows) if patch.rows else slice(None)
    if patch.bias:
        weight[rows].add_(tensors["diff_b"], alpha=patch.strength)
        return
    target = weight.view(weight.shape[0], -1)[rows].view(patch.shape)
    add_delta_(target, delta, patch.strength, tensors.get("dora_scale"))


# A block of a weight's rows worked on at once (`row_blocks`): 1 MiB of fp32, which stays in the CPU's cache
# while it is converted, patched and stored.
BLOCK_ELEMENTS = 1 << 18


def row_blocks(shape: tuple[int, int]) -> Iterator[tuple[int, int]]:
    """[start, stop) row ranges of a (rows, columns) matrix, each at most BLOCK_ELEMENTS (at least one row)."""
    rows, columns = shape
    step = max(1, BLOCK_ELEMENTS // max(1, columns))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def add_rows_(rows: Any, start: int, patches: Sequence[Patch], deltas: Sequence[Any]) -> None:
    """Add to `rows`, the fp32 rows [start, start + len(rows)) of a weight matrix, each patch's part of them."""
    from .delta import add_to_matrix_

    stop = start + rows.shape[0]
    for patch, delta in zip(patches, deltas):
        first, last = patch.rows or (0, stop)
        low, high = max(first, start), min(last, stop)
        if low < high:
            add_to_matrix_(rows[low - start:high - start], delta.rows(low - first, high - first), patch.strength)


def _copy(ctx: JobContext) -> None:
    ctx.sources[0].copy_to(ctx.outputs[0])


def apply_metadata(plan: ApplyPlan, input_autov3: Sequence[str | None], output_autov3: str | None,
                   title: str) -> dict[str, str]:
    """Our record (the checkpoint and each adapter by name and AutoV3, their weights: 1 and the
    strengths) and ModelSpec's keys for the patched checkpoint."""
    names = [Path(plan.checkpoint).name] + [Path(a.path).name for a in plan.adapters]
    strengths = [a.strength for a in plan.adapters]
    record = adapter_record("merge", list(zip(names, input_autov3)), method="apply",
                            weights=[1.0, *strengths], strengths=strengths)
    described = (f"{Path(plan.checkpoint).name} with "
                 + ", ".join(f"{n} at {s:g}" for n, s in zip(names[1:], strengths)) + " applied by lineage")
    return {LINEAGE_RECORD_KEY: json.dumps(record, ensure_ascii=False),
            **modelspec_metadata(architecture=SDXL_ARCHITECTURE, implementation=SDXL_IMPLEMENTATION, title=title,
                                 resolution=SDXL_RESOLUTION, date=datetime.date.today().isoformat(),
                                 prediction_type=plan.prediction_type, merged_from=names, autov3=output_autov3,
                                 description=described)}


@dataclass(frozen=True)
class ApplyResult:
    path: str
    autov3: str
    plan: ApplyPlan
    node: str | None  # the registry node; None with record=False or when recording failed
    record_error: str | None = None


AdapterSpec = str | os.PathLike | tuple[str | os.PathLike, float] | AdapterInput


def adapter_inputs(adapters: Sequence[AdapterSpec]) -> list[AdapterInput]:
    """`adapters` as AdapterInputs: a path is taken at strength 1, a (path, strength) pair at its strength
    (a finite number, else a one-line error). `lmerge apply`, `lora-merge`, sampling and a merge's
    adapters all take their adapters through here."""
    from lineage.merge.parameters import is_number

    found = []
    for a in adapters:
        if isinstance(a, AdapterInput):
            found.append(a)
        elif isinstance(a, tuple):
            if len(a) != 2:
                raise LineageError(f"an adapter is a path or a (path, strength) pair, got {a!r}")
            path, strength = os.fspath(a[0]), a[1]
            if not (is_number(strength) and math.isfinite(strength)):
                raise LineageError(f"{path}: the strength must be a finite number, got {strength!r}")
            found.append(AdapterInput(path, float(strength)))
        else:
            found.append(AdapterInput(os.fspath(a)))
    return found


def plan(checkpoint: str | os.PathLike, adapters: Sequence[AdapterSpec]) -> ApplyPlan:
    """The plan of an apply (what `--dry-run` shows), from the headers only."""
    from lineage.io.safetensors import read_header

    checkpoint = os.fspath(checkpoint)
    detection = _require_checkpoint(checkpoint)
    return plan_apply(checkpoint, read_header(checkpoint)[0], adapter_inputs(adapters), detection.prediction_type)


def _require_checkpoint(path: str) -> Any:
    detection = require_sdxl(path)
    if detection.format != "sdxl-single-file":
        raise CheckpointError("is a diffusers folder; apply needs a single-file SDXL checkpoint", path)
    return detection


def apply(checkpoint: str | os.PathLike, adapters: Sequence[AdapterSpec], output: str | os.PathLike, *,
          record: bool = True, registry: Any = None, title: str | None = None, workers: int = DEFAULT_WORKERS,
          progress: bool = True) -> ApplyResult:
    """Write `checkpoint` with `adapters` (paths, (path, strength) pairs or AdapterInputs) baked in to
    `output`. Unless `record=False` the output is registered as a `merge` of the checkpoint and the
    adapters; if that fails the output stays and `record_error` says why."""
    from lineage.engine.executor import run_jobs
    from lineage.engine.inputs import InputFile
    from lineage.graph.registry import known_autov3

    checkpoint, output = os.fspath(checkpoint), os.fspath(output)
    inputs = adapter_inputs(adapters)
    if not inputs:
        raise LineageError("give at least one adapter to apply")
    file_destination(output, [checkpoint, *(a.path for a in inputs)])
    detection = _require_checkpoint(checkpoint)
    with ExitStack() as stack:
        files = [stack.enter_context(InputFile(p)) for p in [checkpoint, *(a.path for a in inputs)]]
        known = known_autov3([f.path for f in files], registry)  # after opening, as merges do
        apply_plan = plan_apply(checkpoint, files[0].header.tensors, inputs, detection.prediction_type)
        name = title or Path(output).stem

        def metadata(input_autov3: list[str | None], output_autov3: str | None) -> dict[str, str]:
            return apply_metadata(apply_plan, input_autov3, output_autov3, name)

        result = run_jobs(files, ApplyJobs(apply_plan).jobs(), output, metadata=metadata, known_autov3=known,
                          workers=workers, progress=progress, description="apply")
    node, record_error = None, None
    if record:
        node, record_error = _record(apply_plan, output, result.input_autov3, result.output_autov3, registry)
    return ApplyResult(output, result.output_autov3, apply_plan, node, record_error)


def _record(plan: ApplyPlan, output: str, input_autov3: Sequence[str], output_autov3: str,
            registry: Any) -> tuple[str | None, str | None]:
    """Register the output with a `merge` edge from the checkpoint (weight 1) and each adapter (its strength)."""
    from lineage.graph.recording import record_written

    parents = [plan.checkpoint, *(a.path for a in plan.adapters)]
    strengths = [a.strength for a in plan.adapters]
    return record_written(output, output_autov3, parents, input_autov3, "merge",
                          {"method": "apply", "strengths": strengths}, registry, weights=[1.0, *strengths])


class _CallableModule(types.ModuleType):
    """`lineage.adapters.apply(...)` calls `apply` while `lineage.adapters.apply` stays this module."""

    def __call__(self, *args: Any, **kwargs: Any) -> ApplyResult:
        return apply(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
