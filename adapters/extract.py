"""`lineage.adapters.extract(base, tuned, output, ...)`: a LoRA / LoCon (or a full `diff`) extracted from a
fine-tune and its base, as planners on the one executor (lineage/engine/executor.py) —
docs/adapters.md, "Extraction".

A LoRA is extracted in two runs of the executor:
1. analysis: one job per module reads the module's weight from both checkpoints (the OpenCLIP-G q, k
   and v modules each read their third of `in_proj_weight`), takes the difference in fp32 and factors
   it up to the largest rank any rule could keep (adapters/decompose.py). Only the factors stay in
   memory (a file's worth of them: ~0.5 GB for rank 64 at full size), never the checkpoints; the run
   also hashes both inputs (their AutoV3, unless the registry knows them);
2. writing: with every module's factors known, the ranks are chosen (per module by a rule, or for
   all modules at once by a size budget), and a second run, reading nothing, writes `lora_down`,
   `lora_up` and `alpha` of each module in kohya's names, then the metadata (kohya `ss_*`, ModelSpec,
   our record with every module's rank and error).
The output shapes of run 2 depend on what run 1 found, which is why there are two; a `diff`
extraction needs no choice and is a single run writing each module's difference as it is read.

alpha = rank for every module (a scale of 1): one alpha/rank ratio across the file, which diffusers
needs to scale every module right. Modules whose weights are identical in both files are left out and
counted; a component (UNet, CLIP-L, OpenCLIP-G) is reported with the relative size of its change
‖Δ‖/‖W‖, so a changed text encoder is never dropped for being changed only a little.
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lineage.errors import LineageError
from lineage.io.atomic import file_destination
from lineage.io.hashing import FileHashes
from lineage.io.safetensors import DTYPES

from .decompose import Factors, RankRule, allocate, low_rank, sum_squares
from .metadata import BaseModel, adapter_metadata, adapter_record
from .modules import ADAPTED_COMPONENTS, Module, sdxl_modules
from .writer import adapter_key, lora_shapes

if TYPE_CHECKING:
    import torch

    from lineage.engine.executor import JobContext
    from lineage.engine.jobs import Job

TYPES = ("lora", "locon", "diff")
OUTPUT_DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}
DEFAULT_MAX_RANK = 128  # the most a rank mode or a size budget may give one module, unless told otherwise


@dataclass(frozen=True)
class ModuleResult:
    """What extraction made of one module: its rank (0: unchanged, left out) and relative error."""

    name: str
    component: str
    rank: int
    params: int
    relative_error: float
    norm2: float  # ‖Δ‖²
    base_norm2: float  # ‖W_base‖²


@dataclass
class ExtractResult:
    path: str
    autov3: str
    type: str
    modules: list[ModuleResult]
    base_autov3: str
    tuned_autov3: str
    exact: bool
    node: str | None = None
    record_error: str | None = None
    components: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def total_error(self) -> float:
        """‖Δ − ΔLoRA‖ / ‖Δ‖ over every module together."""
        total = sum(m.norm2 for m in self.modules)
        residual = sum(m.norm2 * m.relative_error ** 2 for m in self.modules)
        return (residual / total) ** 0.5 if total > 0 else 0.0

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules)


def _module_difference(ctx: JobContext, module: Module) -> tuple[torch.Tensor, float]:
    """Δ = tuned − base of `module` as an (out, in·kh·kw) fp32 matrix, and ‖W_base‖²."""
    base, tuned = (reader.fp32() for reader in ctx.sources)
    if module.rows is not None:
        base, tuned = base[module.rows[0]:module.rows[1]], tuned[module.rows[0]:module.rows[1]]
    base_norm2 = sum_squares(base)
    # In place: the fp32 copy of the tuned weight is the worker's, and no allocation is as cheap as none.
    return tuned.sub_(base).reshape(module.shape[0], -1), base_norm2


class _Analysis:
    """Run 1: every module's factors (or, for a full diff, only its norms), computed by the jobs."""

    def __init__(self, modules: Sequence[Module], paths: Sequence[str], max_ranks: dict[str, int], exact: bool,
                 dtype: str):
        self.modules, self.paths, self.max_ranks, self.exact = modules, paths, max_ranks, exact
        self.keep_as = DTYPES[OUTPUT_DTYPES[dtype]]  # factors are kept as they will be stored
        self.factors: dict[str, Factors] = {}
        self.base_norm2: dict[str, float] = {}
        self._lock = threading.Lock()

    def jobs(self) -> list[Job]:
        from lineage.engine.jobs import Job, Source

        return [Job((Source(0, m.key), Source(1, m.key)), (), self._job(m)) for m in self.modules]

    def _job(self, module: Module) -> Any:
        def analyse(ctx: JobContext) -> None:
            delta, base_norm2 = _module_difference(ctx, module)
            _check_finite(delta, module, self.paths)
            factors = low_rank(ctx.to_device(delta), self.max_ranks[module.name], exact=self.exact)
            factors = Factors(factors.up.cpu(), factors.singular.cpu(), factors.down.cpu(), factors.norm2,
                              None if factors.spectrum is None else factors.spectrum.cpu()).to(self.keep_as)
            with self._lock:
                self.factors[module.name] = factors
                self.base_norm2[module.name] = base_norm2
        return analyse


def _check_finite(delta: torch.Tensor, module: Module, paths: Sequence[str]) -> None:
    if not math.isfinite(sum_squares(delta)):  # finite exactly when every value is: no pass over a bool mask
        raise LineageError(f"tensor {module.key!r} holds NaN or Inf in one of the two checkpoints; "
                           "no adapter can carry that", paths[1])


def _check_pair(base: Any, tuned: Any, modules: Iterable[Module], paths: Sequence[str]) -> None:
    """Both checkpoints have every module's weight, with the same shape."""
    for module in modules:
        if module.key not in tuned.tensors:
            raise LineageError(f"has no tensor {module.key!r}, which the base has: not a fine-tune of it", paths[1])
        if tuple(tuned.tensors[module.key].shape) != tuple(base.tensors[module.key].shape):
            raise LineageError(f"tensor {module.key!r} has shape {tuple(tuned.tensors[module.key].shape)}, the base "
                               f"{tuple(base.tensors[module.key].shape)}: not a fine-tune of the same architecture",
                               paths[1])


def _flat_width(module: Module) -> int:
    width = 1
    for d in module.shape[1:]:
        width *= d
    return width


def _cost(module: Module) -> int:
    """Parameters one rank of `module` costs in a LoRA (a row of down, a column of up)."""
    return module.shape[0] + _flat_width(module)


def parse_size(text: str) -> int:
    """'200MB', '1.5GB', '300000000' -> bytes (SI units, as file managers show sizes)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGIB")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or not value > 0:
        raise LineageError(f"cannot read the size {text!r}; give e.g. 200MB or 1.5GB")
    return int(value * units[unit])


def extract(base: str | os.PathLike, tuned: str | os.PathLike, output: str | os.PathLike, *, type: str = "lora",
            rank: int = 32, conv_rank: int | None = None, rank_mode: str = "fixed", rank_param: float | None = None,
            size: int | str | None = None, params: int | None = None, max_rank: int | None = None,
            components: Sequence[str] = ADAPTED_COMPONENTS, exact: bool = False, dtype: str = "fp16",
            record: bool = True, registry: Any = None, workers: int = 2, progress: bool = True,
            device: str | None = None) -> ExtractResult:
    """Extract the difference `tuned` − `base` (two SDXL checkpoints) as an adapter written to `output`.

    `type`: "lora" (kohya's default modules), "locon" (plus the convolutions; 3x3 ones at `conv_rank`,
    default `rank`) or "diff" (the exact difference of every module). Ranks: `rank` for every module
    (`rank_mode` "fixed"), or a rule (`rank_mode` ratio / threshold / energy / quantile with
    `rank_param`, at most `max_rank`), or one budget for the whole file: `size` (bytes, or "200MB")
    or `params` (parameters). `exact`: full SVDs instead of the randomized range finder. `dtype`:
    fp16, bf16 or fp32 factors. The output is recorded as an `adapter` node whose parent is `base`."""
    from lineage.engine.device import compute_device
    from lineage.engine.executor import run_jobs
    from lineage.engine.inputs import InputFile
    from lineage.graph.registry import known_autov3
    from lineage.sdxl.detection import require_sdxl

    if type not in TYPES:
        raise LineageError(f"unknown adapter type {type!r}; choose one of {', '.join(TYPES)}")
    if dtype not in OUTPUT_DTYPES:
        raise LineageError(f"unknown dtype {dtype!r}; choose one of {', '.join(OUTPUT_DTYPES)}")
    paths = [os.fspath(base), os.fspath(tuned)]
    output = os.fspath(output)
    file_destination(output, paths)
    if os.path.realpath(paths[0]) == os.path.realpath(paths[1]):
        raise LineageError("is given as both the base and the fine-tune: there is no difference to extract", paths[0])
    budget = _budget(size, params, dtype)
    rules = _rules(type, rank, conv_rank, rank_mode, rank_param, max_rank, budget)
    prediction = [require_sdxl(path) for path in paths][0].prediction_type
    compute_on = compute_device(device)
    with InputFile(paths[0]) as base_file, InputFile(paths[1]) as tuned_file:
        modules = sdxl_modules(base_file.tensors, conv=type == "locon", components=components)
        if not modules:
            raise LineageError(f"has no adaptable modules in {', '.join(components)}", paths[0])
        _check_pair(base_file, tuned_file, modules, paths)
        known = known_autov3(paths, registry)
        inputs = [base_file, tuned_file]
        if type == "diff":
            return _extract_diff(inputs, modules, paths, output, known, dtype, record, registry, workers, progress,
                                 compute_on, prediction)
        max_ranks = {m.name: rules[m.spatial].max_rank for m in modules}
        analysis = _Analysis(modules, paths, max_ranks, exact, dtype)
        found = run_jobs(inputs, analysis.jobs(), None, known_autov3=known, workers=workers, progress=progress,
                         description="analyse", device=compute_on)
    factors = analysis.factors
    if budget is not None:
        ranks = allocate(factors, {m.name: _cost(m) for m in modules}, budget)
    else:
        ranks = {m.name: rules[m.spatial].rank(factors[m.name]) for m in modules}
    results = [ModuleResult(m.name, m.component, ranks[m.name], ranks[m.name] * _cost(m),
                            factors[m.name].relative_error(ranks[m.name]), factors[m.name].norm2,
                            analysis.base_norm2[m.name]) for m in modules]
    kept = [(m, ranks[m.name]) for m in modules if ranks[m.name] > 0]
    if not kept:
        raise LineageError("has the same weights as the base in every module: there is nothing to extract", paths[1])
    jobs = [job for module, r in kept for job in _write_jobs(module, r, factors[module.name], OUTPUT_DTYPES[dtype])]
    input_autov3 = list(found.input_autov3)
    summary = _summary(type, rank, conv_rank, rank_mode, rank_param, budget, exact, results)
    common = {r for _, r in kept}
    dim: int | str = common.pop() if len(common) == 1 else "Dynamic"

    def metadata(_: list[str | None], output_autov3: str | None) -> dict[str, str]:
        return _metadata(type, dim, paths, input_autov3, output, output_autov3, summary, results, rank, conv_rank,
                         prediction)

    written = run_jobs([], jobs, output, metadata=metadata, workers=workers, progress=False, description="write")
    result = ExtractResult(output, written.output_autov3, type, results, input_autov3[0], input_autov3[1], exact,
                           components=_components(results))
    if record:
        _record(result, paths, summary, registry)
    return result


def _budget(size: int | str | None, params: int | None, dtype: str) -> int | None:
    """The parameter budget of a size or a parameter count (None: no global budget)."""
    if size is not None and params is not None:
        raise LineageError("give --size or --params, not both")
    if size is not None:
        nbytes = parse_size(size) if isinstance(size, str) else int(size)
        return nbytes // {"fp16": 2, "bf16": 2, "fp32": 4}[dtype]
    if params is not None and params < 1:
        raise LineageError(f"--params must be a positive number of parameters, got {params}")
    return params


def _rules(type: str, rank: int, conv_rank: int | None, mode: str, param: float | None, max_rank: int | None,
           budget: int | None) -> dict[bool, RankRule]:
    """The rank rule of linear layers (False) and of spatial convolutions (True)."""
    if type == "diff":
        return {}
    if budget is not None:
        top = max_rank or DEFAULT_MAX_RANK
        return {False: RankRule("fixed", top, top), True: RankRule("fixed", top, top)}
    if mode == "fixed":
        if param is not None:
            raise LineageError("--rank-param goes with --rank-mode ratio, threshold, energy or quantile; "
                               "for a fixed rank give --rank")
        return {False: RankRule("fixed", rank, rank),
                True: RankRule("fixed", conv_rank or rank, conv_rank or rank)}
    if param is None:
        raise LineageError(f"--rank-mode {mode} needs --rank-param")
    top = max_rank or DEFAULT_MAX_RANK
    return {False: RankRule(mode, param, top), True: RankRule(mode, param, top)}


def _write_jobs(module: Module, rank: int, factors: Factors, dtype: str) -> list[Job]:
    from lineage.engine.jobs import Job, Output

    up, down = factors.split(rank)
    shapes = lora_shapes(module, rank)
    values = {"lora_down": down.reshape(shapes["lora_down"]), "lora_up": up.reshape(shapes["lora_up"])}

    def fill(role: str) -> Any:
        def write(ctx: JobContext) -> None:
            if role == "alpha":
                ctx.outputs[0].fill_(float(rank))
            else:
                ctx.outputs[0].copy_(values[role])
        return write

    return [Job((), (Output(adapter_key("kohya", module, role), dtype, shapes[role]),), fill(role))
            for role in ("lora_down", "lora_up", "alpha")]


def _extract_diff(inputs: list[Any], modules: Sequence[Module], paths: Sequence[str], output: str,
                  known: list[str | None], dtype: str, record: bool, registry: Any, workers: int, progress: bool,
                  device: Any, prediction: str | None) -> ExtractResult:
    """One run: each module's exact difference written as LyCORIS' `diff` role."""
    from lineage.engine.executor import run_jobs
    from lineage.engine.jobs import Job, Output, Source

    norms: dict[str, tuple[float, float]] = {}
    lock = threading.Lock()

    def job(module: Module) -> Job:
        def write(ctx: JobContext) -> None:
            delta, base_norm2 = _module_difference(ctx, module)
            _check_finite(delta, module, paths)
            ctx.outputs[0].copy_(delta.reshape(module.shape))
            with lock:
                norms[module.name] = (sum_squares(delta), base_norm2)
        out = Output(adapter_key("kohya", module, "diff"), OUTPUT_DTYPES[dtype], module.shape)
        return Job((Source(0, module.key), Source(1, module.key)), (out,), write)

    summary: dict[str, Any] = {"type": "diff"}

    def metadata(input_autov3: list[str | None], output_autov3: str | None) -> dict[str, str]:
        return _metadata("diff", "Dynamic", paths, input_autov3, output, output_autov3, summary, [], 0, None,
                         prediction)

    written = run_jobs(inputs, [job(m) for m in modules], output, metadata=metadata, known_autov3=known,
                       workers=workers, progress=progress, description="extract", device=device)
    results = [ModuleResult(m.name, m.component, 0, m.shape[0] * _flat_width(m), 0.0, *norms[m.name])
               for m in modules]
    result = ExtractResult(output, written.output_autov3, "diff", results, written.input_autov3[0],
                           written.input_autov3[1], True, components=_components(results))
    if record:
        _record(result, paths, summary, registry)
    return result


def _components(results: Sequence[ModuleResult]) -> dict[str, dict[str, float]]:
    """Per component: modules, modules changed, the relative change ‖Δ‖/‖W‖ and the relative error."""
    out: dict[str, dict[str, float]] = {}
    for component in ADAPTED_COMPONENTS:
        mine = [r for r in results if r.component == component]
        if not mine:
            continue
        delta2 = sum(r.norm2 for r in mine)
        weight2 = sum(r.base_norm2 for r in mine)
        residual2 = sum(r.norm2 * r.relative_error ** 2 for r in mine)
        out[component] = {"modules": len(mine), "changed": sum(r.norm2 > 0 for r in mine),
                          "relative_change": (delta2 / weight2) ** 0.5 if weight2 > 0 else 0.0,
                          "relative_error": (residual2 / delta2) ** 0.5 if delta2 > 0 else 0.0}
    return out


def _summary(type: str, rank: int, conv_rank: int | None, mode: str, param: float | None, budget: int | None,
             exact: bool, results: Sequence[ModuleResult]) -> dict[str, Any]:
    total = sum(r.norm2 for r in results)
    residual = sum(r.norm2 * r.relative_error ** 2 for r in results)
    rule: dict[str, Any] = ({"budget_params": budget} if budget is not None else
                            {"rank": rank, **({"conv_rank": conv_rank} if conv_rank else {})} if mode == "fixed" else
                            {"rank_mode": mode, "rank_param": param})
    return {"type": type, **rule, "svd": "exact" if exact else "randomized",
            "total_relative_error": round((residual / total) ** 0.5 if total > 0 else 0.0, 6)}


def _metadata(type: str, dim: int | str, paths: Sequence[str], input_autov3: Sequence[str | None], output: str,
              output_autov3: str | None, summary: dict[str, Any], results: Sequence[ModuleResult], rank: int,
              conv_rank: int | None, prediction: str | None) -> dict[str, str]:
    names = [Path(p).name for p in paths]
    # The base is the parent; the fine-tune is what the adapter reproduces, not a parent of it.
    record = adapter_record("adapter", [(names[0], input_autov3[0])], method="extract",
                            tuned={"name": names[1], "autov3": input_autov3[1]}, **summary,
                            modules={r.name: {"rank": r.rank, "error": round(r.relative_error, 5)}
                                     for r in results if r.rank > 0})
    args = {"conv_dim": conv_rank or rank, "conv_alpha": conv_rank or rank} if type == "locon" else None
    return adapter_metadata(algorithm=type, dim=dim, alpha=dim, base=BaseModel(names[0], input_autov3[0]),
                            title=Path(output).stem, output_autov3=output_autov3, network_args=args,
                            prediction_type=prediction, record=record)


def _record(result: ExtractResult, paths: Sequence[str], summary: dict[str, Any], registry: Any) -> None:
    """Register the adapter with an edge from the base; a failure leaves the written file and says why."""
    from lineage.graph.recording import record as record_file

    def hashes(path: str, autov3: str) -> FileHashes:
        return FileHashes(path, None, None, None, autov3, None)

    params = {"method": "extract", "tuned": Path(paths[1]).name, "tuned_autov3": result.tuned_autov3, **summary}
    try:
        result.node = record_file(result.path, parents=[paths[0]], relation="adapter", params=params,
                                  registry=registry, hashes=hashes(result.path, result.autov3),
                                  parent_hashes=[hashes(paths[0], result.base_autov3)])
    except (LineageError, OSError) as e:
        result.record_error = str(e)

