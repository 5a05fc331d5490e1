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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lineage.engine.allocator import release_freed_memory
from lineage.errors import LineageError
from lineage.io.atomic import file_destination
from lineage.io.safetensors import DTYPES

from .decompose import Factors, RankRule, allocate, low_rank, sum_squares
from .kronecker import (
    KroneckerFit,
    KroneckerShape,
    LokrFactors,
    allocate_ranks,
    kronecker_fit,
    w1_factorable,
    with_low_rank_w1,
)
from .metadata import BaseModel, adapter_metadata, adapter_record
from .modules import ADAPTED_COMPONENTS, Module, sdxl_modules
from .writer import adapter_key, lora_shapes

if TYPE_CHECKING:
    import torch

    from lineage.engine.executor import JobContext
    from lineage.engine.jobs import Job

TYPES = ("lora", "locon", "lokr", "diff")
DEFAULT_RANK = 32
OUTPUT_DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}
DEFAULT_MAX_RANK = 128  # the most a rank mode or a size budget may give one module, unless told otherwise


@dataclass(frozen=True)
class ModuleResult:
    """What extraction made of one module: its rank (0: unchanged, left out; for a LoKr the rank w2
    holds, full or factored), parameters, alpha and relative error; for a LoKr also its factors' shapes
    and the rank and relative error of a LoRA of (at most) as many parameters."""

    name: str
    component: str
    rank: int
    params: int
    relative_error: float
    norm2: float  # ‖Δ‖²
    base_norm2: float  # ‖W_base‖²
    alpha: float = 0.0
    w1_shape: tuple[int, ...] | None = None
    w2_shape: tuple[int, ...] | None = None
    w2_rank: int | None = None  # None: w2 stored full
    w1_rank: int | None = None  # None: w1 stored full
    tucker: bool = False  # w2 stored as a Tucker core lokr_t2 and its mode matrices
    lora_rank: int | None = None
    lora_error: float | None = None


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

    @property
    def lora_error(self) -> float | None:
        """For a LoKr: the total relative error of LoRAs of equal size, module by module (else None)."""
        if self.type != "lokr":
            return None
        total = sum(m.norm2 for m in self.modules)
        residual = sum(m.norm2 * (m.lora_error or 0.0) ** 2 for m in self.modules)
        return (residual / total) ** 0.5 if total > 0 else 0.0


def _module_difference(ctx: JobContext, module: Module) -> tuple[torch.Tensor, float]:
    """Δ = tuned − base of `module` as an (out, in·kh·kw) fp32 matrix, and ‖W_base‖²."""
    base, tuned = (reader.fp32() for reader in ctx.sources)
    if module.rows is not None:
        base, tuned = base[module.rows[0]:module.rows[1]], tuned[module.rows[0]:module.rows[1]]
    base_norm2 = sum_squares(base)
    # In place: the fp32 copy of the tuned weight is the worker's, and no allocation is as cheap as none.
    return tuned.sub_(base).reshape(module.shape[0], -1), base_norm2


class _Analysis:
    """Run 1: each job reads one module's difference and keeps what `decompose` makes of it (LoRA
    factors, or a LoKr) in `found`, with ‖W_base‖² in `base_norm2`. With `exact`, each job gives the
    memory its full SVD freed back to the kernel (`release_freed_memory`): its workspace, up to a few hundred
    MB and shaped by each module, would otherwise stay in the heap in holes no later module's fits,
    and the exact run's peak RSS grew with the modules analysed (4,975 MB at full size)."""

    def __init__(self, modules: Sequence[Module], paths: Sequence[str],
                 decompose: Callable[[torch.Tensor, Module], Any], exact: bool = False):
        self.modules, self.paths, self.decompose, self.exact = modules, paths, decompose, exact
        self.found: dict[str, Any] = {}
        self.base_norm2: dict[str, float] = {}
        self._lock = threading.Lock()

    def jobs(self) -> list[Job]:
        from lineage.engine.jobs import Job, Source

        return [Job((Source(0, m.key), Source(1, m.key)), (), self._job(m)) for m in self.modules]

    def _job(self, module: Module) -> Any:
        def analyse(ctx: JobContext) -> None:
            delta, base_norm2 = _module_difference(ctx, module)
            _check_finite(delta, module, self.paths)
            found = self.decompose(ctx.to_device(delta), module)
            if self.exact:
                release_freed_memory()
            with self._lock:
                self.found[module.name] = found
                self.base_norm2[module.name] = base_norm2
        return analyse


def _lora_decomposer(max_ranks: dict[str, int], exact: bool, keep_as: torch.dtype
                     ) -> Callable[[torch.Tensor, Module], Factors]:
    """A module's truncated SVD up to the largest rank its rule could keep, kept as it will be stored."""
    def decompose(delta: torch.Tensor, module: Module) -> Factors:
        return low_rank(delta, max_ranks[module.name], exact=exact).cpu().to(keep_as)
    return decompose


@dataclass
class _LokrModule:
    """A module's nearest Kronecker product; its layout when a rank rule chose it during the analysis
    (None: a size budget chooses it afterwards, for all modules at once); and the singular values of
    its difference up to the largest rank a LoRA of the LoKr's size could have (None: not even rank 1)."""

    fit: KroneckerFit | None  # kept only for a budget
    stored: LokrFactors | None
    lora: Factors | None


def _lokr_decomposer(splits: dict[str, KroneckerShape], rule: RankRule | None, budgeted: bool, exact: bool,
                     tucker: bool, decompose_both: bool) -> Callable[[torch.Tensor, Module], _LokrModule]:
    """A module's nearest Kronecker product at its split, with w2's SVD up to `rule`'s largest rank (no
    rule: w2 whole); its layout at the rank `rule` chooses, unless `budgeted`; and its difference's
    singular values for the LoRA of equal size."""
    def decompose(delta: torch.Tensor, module: Module) -> _LokrModule:
        split = splits[module.name]
        fit = kronecker_fit(delta, split, 0 if rule is None else rule.max_rank, exact=exact)
        stored = None
        if not budgeted:
            rank = None if rule is None or fit.w2_svd is None else rule.rank(fit.w2_svd)
            if decompose_both and rank and w1_factorable(split, rank):
                fit = with_low_rank_w1(delta, fit, rank)
            stored = fit.layout(rank, tucker=tucker)
        # The most parameters this module's LoKr may hold: its layout's, or (budget) its whole w1 and w2.
        largest = stored.params if stored is not None else split.params
        lora_rank = min(largest // _cost(module), *delta.shape)
        lora = None
        if lora_rank > 0 and fit.norm2 > 0:
            found = low_rank(delta, lora_rank, exact=exact)
            lora = Factors.of_values(found.singular.cpu(), found.norm2)
        return _LokrModule(fit.cpu() if budgeted else None, None if stored is None else stored.cpu(), lora)
    return decompose


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
            rank: int | None = None, conv_rank: int | None = None, rank_mode: str = "fixed",
            rank_param: float | None = None, size: int | str | None = None, params: int | None = None,
            max_rank: int | None = None, factor: int | None = None, kron_rank: int = 1, tucker: bool = False,
            decompose_both: bool = False,
            components: Sequence[str] = ADAPTED_COMPONENTS, exact: bool = False, dtype: str = "fp16",
            record: bool = True, registry: Any = None, workers: int = 2, progress: bool = True,
            device: str | None = None) -> ExtractResult:
    """Extract the difference `tuned` − `base` (two SDXL checkpoints) as an adapter written to `output`.

    `type`: "lora" (kohya's default modules), "locon" (plus the convolutions; 3x3 ones at `conv_rank`,
    default `rank`), "lokr" (the default modules and the convolutions, each as the nearest Kronecker
    product kron(w1, w2)) or "diff" (the exact difference of every module). Ranks: `rank` (default
    DEFAULT_RANK) for every module (`rank_mode` "fixed"), or a rule (`rank_mode` ratio / threshold /
    energy / quantile with `rank_param`, at most `max_rank`), or one budget for the whole file: `size`
    (bytes, or "200MB") or `params` (parameters). For "lokr" the rank, rule or budget applies to w2's
    factorisation (w2 full when none is given, or when factoring does not save parameters; a budget
    counts every tensor, w1 and alpha included); `factor` -1 (default) splits every dimension
    most-square, else at that factor, which must divide it; `kron_rank` the Kronecker rank (LyCORIS'
    format holds 1); `tucker` stores a 3x3 convolution's factored w2 as a Tucker core `lokr_t2` with
    its two mode matrices; `decompose_both` stores w1 too as a pair of w2's rank where that is smaller
    (LyCORIS' option of that name). `exact`: full SVDs instead of the
    randomized range finder. `dtype`: fp16, bf16 or fp32 tensors. The output is recorded as an
    `adapter` node whose parent is `base`."""
    from lineage.engine.device import compute_device
    from lineage.engine.executor import run_jobs
    from lineage.engine.inputs import InputFile
    from lineage.graph.registry import known_autov3
    from lineage.sdxl.detection import require_sdxl

    if type not in TYPES:
        raise LineageError(f"unknown adapter type {type!r}; choose one of {', '.join(TYPES)}")
    if dtype not in OUTPUT_DTYPES:
        raise LineageError(f"unknown dtype {dtype!r}; choose one of {', '.join(OUTPUT_DTYPES)}")
    w2_given = rank is not None or rank_mode != "fixed"  # LoKr: w2 factored only when asked
    _check_lokr_options(type, factor, kron_rank, size is not None or params is not None, w2_given, tucker,
                        decompose_both)
    paths = [os.fspath(base), os.fspath(tuned)]
    output = os.fspath(output)
    file_destination(output, paths)
    if os.path.realpath(paths[0]) == os.path.realpath(paths[1]):
        raise LineageError("is given as both the base and the fine-tune: there is no difference to extract", paths[0])
    budget = parameter_budget(size, params, dtype)
    fixed_rank = DEFAULT_RANK if rank is None else rank
    rules = _rules(type, fixed_rank, conv_rank, rank_mode, rank_param, max_rank, budget)
    prediction = [require_sdxl(path) for path in paths][0].prediction_type
    compute_on = compute_device(device)
    with InputFile(paths[0]) as base_file, InputFile(paths[1]) as tuned_file:
        modules = sdxl_modules(base_file.tensors, conv=type in ("locon", "lokr"), components=components)
        if not modules:
            raise LineageError(f"has no adaptable modules in {', '.join(components)}", paths[0])
        _check_pair(base_file, tuned_file, modules, paths)
        known = known_autov3(paths, registry)
        inputs = [base_file, tuned_file]
        if type == "diff":
            return _extract_diff(inputs, modules, paths, output, known, dtype, record, registry, workers, progress,
                                 compute_on, prediction)
        if type == "lokr":
            decompose: Callable[[torch.Tensor, Module], Any] = _lokr_decomposer(
                _splits(modules, -1 if factor is None else factor),
                rules[False] if w2_given or budget is not None else None, budget is not None, exact, tucker,
                decompose_both)
        else:
            decompose = _lora_decomposer({m.name: rules[m.spatial].max_rank for m in modules}, exact,
                                         DTYPES[OUTPUT_DTYPES[dtype]])
        analysis = _Analysis(modules, paths, decompose, exact)
        found = run_jobs(inputs, analysis.jobs(), None, known_autov3=known, workers=workers, progress=progress,
                         description="analyse", device=compute_on)
    if type == "lokr":
        results, jobs = _lokr_plan(modules, analysis, budget, tucker, OUTPUT_DTYPES[dtype])
    else:
        results, jobs = _lora_plan(modules, analysis, rules, budget, OUTPUT_DTYPES[dtype])
    if not jobs:
        raise LineageError("has the same weights as the base in every module: there is nothing to extract", paths[1])
    input_autov3 = list(found.input_autov3)
    summary = _summary(type, fixed_rank if w2_given else None, conv_rank, rank_mode, rank_param, budget, exact,
                       results, factor, tucker, decompose_both)
    common = {r.alpha for r in results if r.rank > 0}
    dim: float | str = common.pop() if len(common) == 1 else "Dynamic"
    args = _network_args(type, fixed_rank, conv_rank, factor, results, tucker, decompose_both)

    def metadata(_: list[str | None], output_autov3: str | None) -> dict[str, str]:
        return _metadata(type, dim, paths, input_autov3, output, output_autov3, summary, results, args, prediction)

    written = run_jobs([], jobs, output, metadata=metadata, workers=workers, progress=False, description="write")
    result = ExtractResult(output, written.output_autov3, type, results, input_autov3[0], input_autov3[1], exact,
                           components=_components(results))
    if record:
        _record(result, paths, summary, registry)
    return result


def _check_lokr_options(type: str, factor: int | None, kron_rank: int, budgeted: bool, w2_given: bool,
                        tucker: bool, decompose_both: bool) -> None:
    """--factor, --kron-rank, --tucker and --decompose-both belong to LoKr; the last two shape a factored
    w2, so they need a rank or rank mode (a budget chooses only w2's rank: w1 and the layout are fixed)."""
    if type != "lokr":
        for given, option in ((factor is not None, "--factor"), (kron_rank != 1, "--kron-rank"),
                              (tucker, "--tucker"), (decompose_both, "--decompose-both")):
            if given:
                raise LineageError(f"{option} applies to --type lokr only, not {type}")
        return
    if kron_rank < 1:
        raise LineageError(f"--kron-rank must be at least 1, got {kron_rank}")
    if kron_rank > 1:
        raise LineageError(f"--kron-rank {kron_rank}: a LoKr file holds one Kronecker product kron(w1, w2) per "
                           "module (LyCORIS, ComfyUI, A1111 and kohya rebuild exactly that), so it cannot carry "
                           "a sum of several; only --kron-rank 1 can be written")
    if factor is not None and factor != -1 and factor < 1:
        raise LineageError(f"--factor must be -1 (most square) or a positive divisor, got {factor}")
    for given, option in ((tucker, "--tucker"), (decompose_both, "--decompose-both")):
        if given and budgeted:
            raise LineageError(f"{option} goes with --rank or --rank-mode, not with --size or --params (a budget "
                               "chooses w2's rank with w1 whole and w2 a plain pair)")
        if given and not w2_given:
            raise LineageError(f"{option} shapes a factored w2: give --rank or --rank-mode (without them w2 is "
                               "stored whole)")


def _splits(modules: Sequence[Module], factor: int) -> dict[str, KroneckerShape]:
    """Every module's Kronecker split at `factor`, checked before anything is read."""
    splits = {}
    for module in modules:
        try:
            splits[module.name] = KroneckerShape.of(module.shape, factor)
        except LineageError as e:
            raise LineageError(f"{e} of module {module.name} (shape {'x'.join(map(str, module.shape))}); "
                               "give a factor that divides every module's dimensions, or -1") from None
    return splits


def _lora_plan(modules: Sequence[Module], analysis: _Analysis, rules: dict[bool, RankRule], budget: int | None,
               dtype: str) -> tuple[list[ModuleResult], list[Job]]:
    """Every module's rank (by its rule, or all at once by the budget), its result and write jobs."""
    factors: dict[str, Factors] = analysis.found
    if budget is not None:
        ranks = allocate(factors, {m.name: _cost(m) for m in modules}, budget)
    else:
        ranks = {m.name: rules[m.spatial].rank(factors[m.name]) for m in modules}
    results = [ModuleResult(m.name, m.component, ranks[m.name], ranks[m.name] * _cost(m),
                            factors[m.name].relative_error(ranks[m.name]), factors[m.name].norm2,
                            analysis.base_norm2[m.name], alpha=ranks[m.name]) for m in modules]
    jobs = []
    for m in modules:
        r = ranks[m.name]
        if r > 0:
            up, down = factors[m.name].split(r)
            shapes = lora_shapes(m, r)
            tensors = {"lora_down": down.reshape(shapes["lora_down"]), "lora_up": up.reshape(shapes["lora_up"])}
            jobs += _write_jobs(m, tensors, float(r), dtype)
    return results, jobs


def _lokr_plan(modules: Sequence[Module], analysis: _Analysis, budget: int | None, tucker: bool, dtype: str
               ) -> tuple[list[ModuleResult], list[Job]]:
    """Every changed module's LoKr tensors in LyCORIS' layout (adapters/kronecker.py, `LokrFactors`), at
    the ranks a rule chose during the analysis or, with a `budget`, at the ranks allocated now for all
    modules at once. alpha = the pairs' rank, a scale of 1 (with both factors whole loaders take the
    scale as 1 whatever alpha is, and alpha 1 is written)."""
    found: dict[str, _LokrModule] = analysis.found
    if budget is not None:
        ranks = allocate_ranks({m.name: found[m.name].fit for m in modules}, budget)
        stored = {m.name: found[m.name].fit.layout(ranks[m.name], tucker=tucker) for m in modules}
    else:
        stored = {m.name: found[m.name].stored for m in modules}
    results, jobs = [], []
    for m in modules:
        f = stored[m.name]
        changed = f.norm2 > 0
        alpha = float(f.rank or 1)
        lora_rank = min(f.params // _cost(m), m.shape[0], _flat_width(m))
        lora = found[m.name].lora
        lora_error = 0.0 if not changed else 1.0 if lora_rank == 0 or lora is None else lora.relative_error(lora_rank)
        results.append(ModuleResult(m.name, m.component, (f.rank or min(f.split.w2)) if changed else 0,
                                    f.params if changed else 0, f.relative_error, f.norm2,
                                    analysis.base_norm2[m.name], alpha=alpha if changed else 0.0,
                                    w1_shape=f.split.w1, w2_shape=f.split.w2, w2_rank=f.rank, w1_rank=f.w1_rank,
                                    tucker="lokr_t2" in f.tensors, lora_rank=lora_rank, lora_error=lora_error))
        if changed:
            jobs += _write_jobs(m, f.tensors, alpha, dtype)
    return results, jobs


def parameter_budget(size: int | str | None, params: int | None, dtype: str) -> int | None:
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


def _write_jobs(module: Module, tensors: dict[str, torch.Tensor], alpha: float, dtype: str) -> list[Job]:
    """One job per tensor of `module` (role -> tensor in its stored shape), and one for its alpha."""
    from lineage.engine.jobs import Job, Output

    def fill(role: str) -> Any:
        def write(ctx: JobContext) -> None:
            if role == "alpha":
                ctx.outputs[0].fill_(alpha)
            else:
                ctx.outputs[0].copy_(tensors[role])
        return write

    shapes = {**{role: tuple(t.shape) for role, t in tensors.items()}, "alpha": ()}
    return [Job((), (Output(adapter_key("kohya", module, role), dtype, shape),), fill(role))
            for role, shape in shapes.items()]


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
        return _metadata("diff", "Dynamic", paths, input_autov3, output, output_autov3, summary, [], None,
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


def _summary(type: str, rank: int | None, conv_rank: int | None, mode: str, param: float | None,
             budget: int | None, exact: bool, results: Sequence[ModuleResult], factor: int | None,
             tucker: bool = False, decompose_both: bool = False) -> dict[str, Any]:
    """What the record keeps of the run: the rank rule, the SVD path and the total error (for a LoKr
    also its factor, Kronecker rank, and the total error of LoRAs of equal size). `rank` None: a LoKr's
    w2 is stored full."""
    def total(errors: Iterable[tuple[float, float]]) -> float:
        pairs = list(errors)
        norm2 = sum(n for n, _ in pairs)
        return round((sum(n * e ** 2 for n, e in pairs) / norm2) ** 0.5 if norm2 > 0 else 0.0, 6)

    if budget is not None:
        rule: dict[str, Any] = {"budget_params": budget}
    elif mode != "fixed":
        rule = {"rank_mode": mode, "rank_param": param}
    elif rank is None:
        rule = {"w2": "full"}
    else:
        rule = {"rank": rank, **({"conv_rank": conv_rank} if conv_rank and type != "lokr" else {})}
    lokr = ({"factor": -1 if factor is None else factor, "kron_rank": 1, "tucker": tucker,
             "decompose_both": decompose_both} if type == "lokr" else {})
    summary = {"type": type, **lokr, **rule, "svd": "exact" if exact else "randomized",
               "total_relative_error": total((r.norm2, r.relative_error) for r in results)}
    if type == "lokr":
        summary["lora_equal_params_relative_error"] = total((r.norm2, r.lora_error or 0.0) for r in results)
    return summary


def _network_args(type: str, rank: int, conv_rank: int | None, factor: int | None,
                  results: Sequence[ModuleResult], tucker: bool = False,
                  decompose_both: bool = False) -> dict[str, Any] | None:
    """kohya's ss_network_args besides `algo` (adapters/metadata.py adds it): LoCon's conv rank, LoKr's
    factor (and full_matrix when no module's w2 is factored, use_tucker and decompose_both when asked,
    as LyCORIS writes them)."""
    if type == "locon":
        return {"conv_dim": conv_rank or rank, "conv_alpha": conv_rank or rank}
    if type == "lokr":
        full = all(r.w2_rank is None for r in results)
        return {"factor": -1 if factor is None else factor, **({"full_matrix": True} if full else {}),
                **({"use_tucker": True} if tucker else {}), **({"decompose_both": True} if decompose_both else {})}
    return None


def _metadata(type: str, dim: float | str, paths: Sequence[str], input_autov3: Sequence[str | None], output: str,
              output_autov3: str | None, summary: dict[str, Any], results: Sequence[ModuleResult],
              network_args: dict[str, Any] | None, prediction: str | None) -> dict[str, str]:
    names = [Path(p).name for p in paths]
    modules = {}
    for r in results:
        if r.rank > 0:
            modules[r.name] = {"rank": r.rank, "error": round(r.relative_error, 5)}
            if r.lora_error is not None:
                modules[r.name]["lora_error"] = round(r.lora_error, 5)
    # The base is the parent; the fine-tune is what the adapter reproduces, not a parent of it.
    record = adapter_record("adapter", [(names[0], input_autov3[0])], method="extract",
                            tuned={"name": names[1], "autov3": input_autov3[1]}, **summary, modules=modules)
    return adapter_metadata(algorithm=type, dim=dim, alpha=dim, base=BaseModel(names[0], input_autov3[0]),
                            title=Path(output).stem, output_autov3=output_autov3, network_args=network_args,
                            prediction_type=prediction, record=record)


def _record(result: ExtractResult, paths: Sequence[str], summary: dict[str, Any], registry: Any) -> None:
    """Register the adapter with an edge from the base; a failure leaves the written file and says why."""
    from lineage.graph.recording import record_written

    params = {"method": "extract", "tuned": Path(paths[1]).name, "tuned_autov3": result.tuned_autov3, **summary}
    result.node, result.record_error = record_written(result.path, result.autov3, paths[:1], [result.base_autov3],
                                                      "adapter", params, registry)

