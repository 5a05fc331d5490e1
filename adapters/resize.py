"""`lineage.adapters.resize(adapter, output, ...)`: a LoRA / LoCon re-truncated to other ranks without its
base, as a planner on the one executor (lineage/engine/executor.py) — docs/adapters.md, "Resizing".

    import lineage.adapters
    lineage.adapters.resize("style_r64.safetensors", "style_r16.safetensors", rank=16)

Each module's change is s·up @ down (s = alpha / rank; a Tucker `lora_mid` folded into down). Its SVD
needs no product of the full size: with the thin QR decompositions up = Qu·Ru and downᵀ = Qd·Rd,
up @ down = Qu·(Ru·Rdᵀ)·Qdᵀ, so the SVD of the small r×r matrix Ru·Rdᵀ = U·S·Vh gives the product's,
(Qu·U)·S·(Vh·Qdᵀ), at (out + in)·r² operations (`product_factors`). The new ranks are then chosen by
extraction's own rules (adapters/decompose.py: a fixed rank, ratio, threshold, energy or quantile per
module, or one parameter budget for the whole file with the least total error), and each module keeps
the share of ‖ΔW‖² its singular values retain, reported with the relative error ‖ΔW − ΔW′‖ / ‖ΔW‖.

A resize cannot add rank: a module asked for more than its change has keeps its own and is counted
(kohya's resize_lora pads such a module with singular values that are zero; we keep the file smaller).
alpha / rank: when every input module has the same ratio, the output keeps it (alpha′ = ratio · new
rank); when the ratios differ, each module's scale is folded into its factors and alpha′ = new rank (a
scale of 1 everywhere), one ratio for the whole file, as diffusers needs. The output keeps the input's
key dialect (kohya or PEFT; other read-only dialects are written as kohya), its factors' dtype and its
metadata, with the dims, hashes and our record updated; it is recorded as a `convert` of the input.
LoKr, LoHa, full diffs and DoRA modules are refused: their change is not a product of two factors.
"""
from __future__ import annotations

import json
import math
import os
import sys
import threading
import types
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lineage.engine.finite import all_finite
from lineage.engine.jobs import Job, Output, Source
from lineage.errors import CheckpointError, LineageError
from lineage.graph.metadata import LINEAGE_RECORD_KEY
from lineage.io.atomic import file_destination

from .convert import SELF_DESCRIBING
from .decompose import Factors, RankRule, allocate
from .dialects import DIALECTS
from .extract import OUTPUT_DTYPES, parameter_budget
from .metadata import adapter_metadata, adapter_record, metadata_number
from .reader import AdapterFile, AdapterModule, open_adapter
from .writer import adapter_key, dialect_metadata

if TYPE_CHECKING:
    import torch

    from lineage.engine.executor import JobContext

DTYPE_NAMES = {stored: name for name, stored in OUTPUT_DTYPES.items()}  # "F16" -> "fp16"
FACTOR_ROLES = ("lora_down", "lora_up", "lora_mid")
RATIO_TOLERANCE = 1e-6  # alpha / rank ratios this close (relatively) count as one ratio
# Entries of the output's metadata that describe the new file: replaced even when the input has them.
UPDATED_ENTRIES = ("ss_network_dim", "ss_network_alpha", "ss_output_name", "sshs_model_hash", "modelspec.title",
                   "modelspec.date", "modelspec.hash_sha256", LINEAGE_RECORD_KEY)


def product_factors(up: torch.Tensor, down: torch.Tensor) -> Factors:
    """The SVD of up @ down (up (out, r), down (r, in)) without forming the product (module docstring):
    balanced factors U·√S and √S·Vh, every singular value (min(out, in, r) of them), ‖up @ down‖².
    Computed in fp64, returned in fp32."""
    import torch

    qu, ru = torch.linalg.qr(up.double())
    qd, rd = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    root = s.sqrt()
    singular = s.float()  # ‖up @ down‖² from the values kept, so that keeping them all leaves no residual
    return Factors(((qu @ u) * root).float(), singular, (root[:, None] * (vh @ qd.T)).float(),
                   float(singular.double().square().sum()), singular)


@dataclass(frozen=True)
class RankChoice:
    """How the new ranks are chosen: one rule for every module, or a parameter `budget` for the file."""

    rule: RankRule | None
    budget: int | None

    @classmethod
    def of(cls, *, rank: int | None, rank_mode: str, rank_param: float | None, max_rank: int | None,
           size: int | str | None, params: int | None, dtype: str, largest: int) -> RankChoice:
        """From the options of `resize` / `lora-merge`; `largest` is the most any module can keep."""
        budget = parameter_budget(size, params, dtype)
        if budget is not None:
            if rank is not None or rank_param is not None:
                raise LineageError("give a rank (--rank or --rank-mode) or a size (--size or --params), not both")
            return cls(None, budget)
        if rank_mode == "fixed":
            if rank_param is not None:
                raise LineageError("--rank-param goes with --rank-mode ratio, threshold, energy or quantile; "
                                   "for a fixed rank give --rank")
            if rank is None:
                raise LineageError("give the new rank: --rank N, --rank-mode with --rank-param, --size or --params")
            return cls(RankRule("fixed", rank, rank), None)
        if rank_param is None:
            raise LineageError(f"--rank-mode {rank_mode} needs --rank-param")
        return cls(RankRule(rank_mode, rank_param, max_rank or rank or largest), None)

    def ranks(self, factors: Mapping[str, Factors], costs: Mapping[str, int]) -> dict[str, int]:
        if self.budget is not None:
            return allocate(dict(factors), dict(costs), self.budget)
        assert self.rule is not None
        return {name: self.rule.rank(f) for name, f in factors.items()}

    def truncate(self, factors: Mapping[str, Factors], layouts: Mapping[str, LoraLayout],
                 rank_in: Mapping[str, int]) -> list[ModuleResize]:
        """Every module of `layouts` (in its order) cut to the rank this choice gives it."""
        ranks = self.ranks(factors, {n: layout.cost for n, layout in layouts.items()})
        return [ModuleResize.truncated(n, rank_in[n], ranks[n], layout.cost, factors[n])
                for n, layout in layouts.items()]

    def asked(self) -> int | None:
        """The fixed rank asked for (what a module may not hold), else None."""
        return int(self.rule.value) if self.rule is not None and self.rule.mode == "fixed" else None

    def summary(self) -> dict[str, Any]:
        if self.budget is not None:
            return {"budget_params": self.budget}
        assert self.rule is not None
        if self.rule.mode == "fixed":
            return {"rank": int(self.rule.value)}
        return {"rank_mode": self.rule.mode, "rank_param": self.rule.value, "max_rank": self.rule.max_rank}


@dataclass(frozen=True)
class ModuleResize:
    """What became of one module: its rank before and after (0: its change is zero, left out), the
    parameters it now costs, the share of its ‖ΔW‖² kept and the relative error ‖ΔW − ΔW′‖ / ‖ΔW‖."""

    name: str
    rank_in: int
    rank: int
    params: int
    retained: float
    relative_error: float
    norm2: float

    @classmethod
    def truncated(cls, name: str, rank_in: int, rank: int, cost: int, factors: Factors) -> ModuleResize:
        """The module whose change `factors` holds, cut to `rank` ranks of `cost` parameters each."""
        retained = 1.0 - factors.residual2(rank) / factors.norm2 if factors.norm2 else 1.0
        return cls(name, rank_in, rank, rank * cost, retained, factors.relative_error(rank), factors.norm2)


@dataclass(kw_only=True)
class LoraResult:
    """What a resize or a lora-merge wrote: the LoRA's path, AutoV3 and dialect, each module's fate and the
    totals over them; `clamped` counts the modules asked for more ranks than their change has."""

    path: str
    autov3: str
    dialect: str
    modules: list[ModuleResize]
    clamped: int = 0
    alpha_ratio: float = 1.0  # alpha / rank of every output module
    alphas_folded: bool = False  # each module's scale went into its factors
    node: str | None = None
    record_error: str | None = None

    @property
    def total_retained(self) -> float:
        """The share of Σ‖ΔW‖² over every module that the output keeps."""
        total = sum(m.norm2 for m in self.modules)
        return sum(m.norm2 * m.retained for m in self.modules) / total if total > 0 else 1.0

    @property
    def total_error(self) -> float:
        """The relative error ‖ΔW − ΔW′‖ / ‖ΔW‖ over every module together."""
        return math.sqrt(max(0.0, 1.0 - self.total_retained))

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules)


@dataclass(kw_only=True)
class ResizeResult(LoraResult):
    """A resize's result; `alphas_folded`: the input's alpha / rank ratios differed."""

    source_autov3: str


@dataclass(frozen=True)
class LoraLayout:
    """How a module's LoRA factors are stored: rows `out`, down's dimensions after the rank (in, and the
    kernel of a convolution), up's after the rank ((1, 1) for a convolution), the factors' dtype."""

    out: int
    down_tail: tuple[int, ...]
    up_tail: tuple[int, ...]
    dtype: str

    @property
    def spatial(self) -> bool:
        """A convolution with a kernel larger than 1x1 (kohya gives these conv_dim)."""
        return any(k > 1 for k in self.down_tail[1:])

    @property
    def cost(self) -> int:
        """Parameters one rank costs (a row of down, a column of up)."""
        return self.out + math.prod(self.down_tail)

    def shapes(self, rank: int) -> dict[str, tuple[int, ...]]:
        return {"lora_down": (rank, *self.down_tail), "lora_up": (self.out, rank, *self.up_tail), "alpha": ()}

    @classmethod
    def of(cls, module: AdapterModule, tensors: Mapping[str, Any]) -> LoraLayout:
        s = module.shapes
        kernel = s["lora_mid"][2:] if "lora_mid" in s else s["lora_down"][2:]
        dtype = tensors[module.keys["lora_down"]].dtype
        return cls(s["lora_up"][0], (s["lora_down"][1], *kernel), s["lora_up"][2:],
                   dtype if dtype in DTYPE_NAMES else "F32")


def budget_dtype(layouts: Iterable[LoraLayout]) -> str:
    """The dtype a size budget is counted in: the one most of the modules' factors are stored in ("fp16")."""
    dtypes = [layout.dtype for layout in layouts]
    return DTYPE_NAMES[max(set(dtypes), key=dtypes.count)]


def require_lora(adapter: AdapterFile, verb: str) -> None:
    """Refuse, in one line naming the file, a module whose change is not up @ down."""
    for module in adapter.modules.values():
        if module.algorithm != "lora":
            raise CheckpointError(f"module {module.name} is {module.algorithm}: only LoRA / LoCon modules can be "
                                  f"{verb} (their change is a product of two factors)", adapter.path)
        if "dora_scale" in module.keys:
            raise CheckpointError(f"module {module.name} is DoRA: its change depends on the base weight, so it "
                                  f"cannot be {verb} without the base", adapter.path)


def module_scale(module: AdapterModule) -> float:
    """alpha / rank; 1 without alpha."""
    return 1.0 if module.alpha is None else module.alpha / (module.rank or 1)


def common_ratio(ratios: Sequence[float]) -> float | None:
    """The one alpha / rank ratio of `ratios`, or None when they differ."""
    first = ratios[0]
    return first if all(math.isclose(r, first, rel_tol=RATIO_TOLERANCE) for r in ratios) else None


def scaled_factors(readers: Sequence[Any], roles: Sequence[str], module: AdapterModule, strength: float,
                   path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(strength · scale · up, down) of `module` from the job's `readers` of its `roles`, 2-D fp32, a
    Tucker core folded into down (adapters/delta.py); a NaN or Inf names the file `path`."""

    from .delta import rebuild

    tensors = {}
    for role, reader in zip(roles, readers):
        value = reader.fp32()
        if not all_finite(value):
            raise CheckpointError(f"tensor {reader.info.name!r} holds NaN or Inf", path)
        tensors[role] = value
    delta = rebuild("lora", tensors, module.alpha)
    return delta.factors[0] * (delta.scale * strength), delta.factors[1]


def factor_roles(module: AdapterModule) -> list[str]:
    """The roles a job reads of a LoRA module, in a fixed order (alpha is the reader's)."""
    return [r for r in FACTOR_ROLES if r in module.keys]


class FactorAnalysis:
    """Run 1: one job per module reads its factors and computes the SVD of its scaled change."""

    def __init__(self, adapter: AdapterFile):
        self.adapter = adapter
        self.factors: dict[str, Factors] = {}
        self._lock = threading.Lock()

    def jobs(self) -> list[Job]:
        return [Job(tuple(Source(0, module.keys[r]) for r in factor_roles(module)), (), self._job(module))
                for module in self.adapter.modules.values()]

    def _job(self, module: AdapterModule) -> Any:
        def analyse(ctx: JobContext) -> None:
            up, down = scaled_factors(ctx.sources, factor_roles(module), module, 1.0, self.adapter.path)
            factors = product_factors(up, down)
            with self._lock:
                self.factors[module.name] = factors
        return analyse


def lora_outputs(dialect: str, name: str, layout: LoraLayout, rank: int, alpha_dtype: str) -> dict[str, Output]:
    """The output tensors of one module at `rank`, by role: `lora_down`, `lora_up` and, in kohya's
    dialect, `alpha` (PEFT keeps alpha in the header)."""
    shapes = layout.shapes(rank)
    roles = [r for r in ("lora_down", "lora_up", "alpha") if r in DIALECTS[dialect].suffixes]
    return {role: Output(adapter_key(dialect, name, role), alpha_dtype if role == "alpha" else layout.dtype,
                         shapes[role]) for role in roles}


def fill_lora(outputs: Mapping[str, torch.Tensor], up: torch.Tensor, down: torch.Tensor, ratio: float) -> None:
    """Fill a module's output tensors (by role) from the 2-D factors of its change up @ down, with alpha =
    ratio · rank: the factors are divided by √ratio to keep the change."""
    root = math.sqrt(ratio)
    for role, tensor in outputs.items():
        if role == "alpha":
            tensor.fill_(ratio * up.shape[1])
        else:
            tensor.copy_(((down if role == "lora_down" else up) / root).reshape(tensor.shape))


def write_jobs(dialect: str, name: str, layout: LoraLayout, up: torch.Tensor, down: torch.Tensor, ratio: float,
               alpha_dtype: str) -> list[Job]:
    """One job per output tensor of a module whose factors are known (`fill_lora`)."""
    def fill(role: str) -> Any:
        def write(ctx: JobContext) -> None:
            fill_lora({role: ctx.outputs[0]}, up, down, ratio)
        return write

    outputs = lora_outputs(dialect, name, layout, up.shape[1], alpha_dtype)
    return [Job((), (output,), fill(role)) for role, output in outputs.items()]


def _one_or_dynamic(values: Sequence[float]) -> float | str:
    found = set(values)
    return found.pop() if len(found) == 1 else "Dynamic"


def lora_metadata(kept: Mapping[str, tuple[int, float]], dialect: str, spatial: Collection[str], conv: bool,
                  title: str, output_autov3: str | None, record: Mapping[str, Any],
                  inherited: Mapping[str, str] | None = None) -> dict[str, str]:
    """The metadata of a LoRA we rewrite: `inherited` (the input's, without what described the input
    file itself), the dialect's own entries for the `kept` modules (name -> (rank, alpha)), and kohya's
    and ModelSpec's keys, those that describe the new file replacing the input's (UPDATED_ENTRIES); an
    inherited `ss_network_args` gets the new conv_dim / conv_alpha of the `spatial` (3x3) modules.
    `conv`: some module is a convolution (a LoCon)."""
    metadata = {k: v for k, v in (inherited or {}).items() if k not in SELF_DESCRIBING}
    _update_conv_args(metadata, [kept[n] for n in spatial if n in kept])
    metadata.update(dialect_metadata(dialect, {n: r for n, (r, _) in kept.items()},
                                     {n: a for n, (_, a) in kept.items()}))
    fresh = adapter_metadata(algorithm="locon" if conv else "lora",
                             dim=_one_or_dynamic([r for r, _ in kept.values()]),
                             alpha=_one_or_dynamic([a for _, a in kept.values()]), base=None, title=title,
                             output_autov3=output_autov3, record=record)
    for key, value in fresh.items():
        if key in UPDATED_ENTRIES or key not in metadata:
            metadata[key] = value
    return metadata


def _update_conv_args(metadata: dict[str, str], spatial: Sequence[tuple[int, float]]) -> None:
    """kohya's conv_dim / conv_alpha in `ss_network_args` (when the input has them) for the new ranks, and
    use_tucker off: a Tucker core is folded into lora_down, never written."""
    try:
        args = json.loads(metadata.get("ss_network_args", ""))
    except ValueError:
        return
    if isinstance(args, dict) and "conv_dim" in args and spatial:
        args["conv_dim"] = metadata_number(_one_or_dynamic([r for r, _ in spatial]))
        args["conv_alpha"] = metadata_number(_one_or_dynamic([a for _, a in spatial]))
        if "use_tucker" in args:
            args["use_tucker"] = "False"
        metadata["ss_network_args"] = json.dumps(args)


def output_dialect(adapter: AdapterFile) -> str:
    """The input's dialect when we can write it, else kohya's."""
    return adapter.dialect if DIALECTS[adapter.dialect].writable else "kohya"


def resize(adapter: str | os.PathLike, output: str | os.PathLike, *, rank: int | None = None,
           rank_mode: str = "fixed", rank_param: float | None = None, max_rank: int | None = None,
           size: int | str | None = None, params: int | None = None, record: bool = True, registry: Any = None,
           workers: int = 2, progress: bool = True) -> ResizeResult:
    """Write the LoRA / LoCon `adapter` to `output` at new ranks: `rank` for every module, or a rule
    (`rank_mode` ratio / threshold / energy / quantile with `rank_param`, at most `max_rank`), or one
    budget for the file: `size` (bytes, or "50MB") or `params`. See the module docstring."""
    from lineage.engine.executor import run_jobs
    from lineage.engine.inputs import InputFile
    from lineage.graph.recording import record_written
    from lineage.graph.registry import known_autov3

    source, output = os.fspath(adapter), os.fspath(output)
    file_destination(output, [source])
    opened = open_adapter(source)
    require_lora(opened, "resized")
    layouts = {n: LoraLayout.of(m, opened.tensors) for n, m in opened.modules.items()}
    choice = RankChoice.of(rank=rank, rank_mode=rank_mode, rank_param=rank_param, max_rank=max_rank, size=size,
                           params=params, dtype=budget_dtype(layouts.values()),
                           largest=max(m.rank or 1 for m in opened.modules.values()))
    ratio = common_ratio([module_scale(m) for m in opened.modules.values()])
    analysis = FactorAnalysis(opened)
    with InputFile(source) as input_file:
        found = run_jobs([input_file], analysis.jobs(), None, known_autov3=known_autov3([source], registry),
                         workers=workers, progress=progress, description="analyse")
    factors = analysis.factors
    asked = choice.asked()
    modules = choice.truncate(factors, layouts, {n: m.rank or 0 for n, m in opened.modules.items()})
    kept = [m for m in modules if m.rank > 0]
    if not kept:
        raise CheckpointError("changes nothing (every module's up @ down is zero): there is nothing to resize",
                              source)
    dialect = output_dialect(opened)
    out_ratio = 1.0 if ratio is None else ratio
    jobs = [job for m in kept for job in write_jobs(dialect, m.name, layouts[m.name], *factors[m.name].split(m.rank),
                                                    out_ratio, _alpha_dtype(opened, opened.modules[m.name]))]
    result = ResizeResult(path=output, autov3="", dialect=dialect, modules=modules,
                          source_autov3=found.input_autov3[0], alpha_ratio=out_ratio, alphas_folded=ratio is None,
                          clamped=sum(1 for m in kept if asked is not None and m.rank < asked))
    summary = {**choice.summary(), "total_retained": round(result.total_retained, 6),
               "total_relative_error": round(result.total_error, 6), "alpha_ratio": out_ratio,
               "alphas_folded": ratio is None}
    conv = any(len(layouts[m.name].down_tail) > 1 for m in kept)
    spatial = [m.name for m in kept if layouts[m.name].spatial]

    def metadata(_: list[str | None], output_autov3: str | None) -> dict[str, str]:
        record_fields = adapter_record("convert", [(Path(source).name, result.source_autov3)], method="resize",
                                       **summary, modules={m.name: {"rank_in": m.rank_in, "rank": m.rank,
                                                                    "retained": round(m.retained, 6),
                                                                    "error": round(m.relative_error, 5)}
                                                           for m in kept})
        return lora_metadata({m.name: (m.rank, out_ratio * m.rank) for m in kept}, dialect, spatial, conv,
                             Path(output).stem, output_autov3, record_fields, opened.metadata)

    written = run_jobs([], jobs, output, metadata=metadata, workers=workers, progress=False, description="write")
    result.autov3 = written.output_autov3
    if record:
        result.node, result.record_error = record_written(output, result.autov3, [source], [result.source_autov3],
                                                          "convert", {"method": "resize", **summary}, registry)
    return result


def _alpha_dtype(adapter: AdapterFile, module: AdapterModule) -> str:
    """The input's alpha tensor dtype, else the factors' (what kohya writes)."""
    key = module.keys.get("alpha") or module.keys["lora_down"]
    dtype = adapter.tensors[key].dtype
    return dtype if dtype in DTYPE_NAMES else "F32"


class _CallableModule(types.ModuleType):
    """`lineage.adapters.resize(...)` calls `resize` while `lineage.adapters.resize` stays this module."""

    def __call__(self, *args: Any, **kwargs: Any) -> ResizeResult:
        return resize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
